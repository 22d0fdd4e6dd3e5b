"""Exact, readable head selections: ``"transformer_blocks.12:3,7; single_transformer_blocks.0-3:*"``.

Grammar (entries separated by ``;``)::

    entry  := layers [":" heads]          no heads part means every head
    layers := NAME "." INDEX | NAME "." LO "-" HI      (inclusive range of block indices)
              | full module name as diffusers prints it (e.g. ``down_blocks.2.attentions.1``)
    heads  := "*" | item ("," item)*      item := INT | LO "-" HI (inclusive)

Layer names are matched exactly, never as a regex or a prefix (``transformer_blocks.1`` does not
select ``transformer_blocks.10``). A name may point at an attention module or at a block holding
one; the family adapter decides which attention of a block is meant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_RANGE = re.compile(r"^(?P<prefix>.+)\.(?P<lo>\d+)-(?P<hi>\d+)$")


@dataclass(frozen=True)
class HeadEntry:
    """One parsed entry: a layer name and its heads (None = all heads)."""

    layer: str
    heads: tuple[int, ...] | None


def _parse_heads(text: str, entry: str) -> tuple[int, ...] | None:
    text = text.strip()
    if text == "*":
        return None
    heads: list[int] = []
    for item in text.split(","):
        item = item.strip()
        lo, sep, hi = item.partition("-")
        if not (lo.isdigit() and (not sep or hi.isdigit())):
            raise ValueError(f"heads {text!r} in {entry!r}: expected '*', 'i', 'i,j' or 'i-j' (non-negative integers)")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"heads range {item!r} in {entry!r} is empty (end < start)")
        heads.extend(range(first, last + 1))
    return tuple(sorted(set(heads)))


def parse_heads(spec: str, field: str = "heads") -> list[HeadEntry]:
    """Parse a selection string into entries, expanding layer ranges; no model needed. ``field`` names the
    config field in errors."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{field}={spec!r}: expected a selection such as 'transformer_blocks.2:0,3'")
    entries: list[HeadEntry] = []
    for i, raw in enumerate(spec.split(";")):
        raw = raw.strip()
        if not raw:
            raise ValueError(f"{field}={spec!r}: entry {i + 1} is empty; expected entries such as "
                             "'transformer_blocks.2:0,3' separated by ';'")
        layer, colon, heads_text = raw.partition(":")
        layer = layer.strip()
        if not layer:
            raise ValueError(f"heads entry {raw!r} names no layer; expected 'layer' or 'layer:heads'")
        if colon and not heads_text.strip():
            raise ValueError(f"heads entry {raw!r} has an empty heads part; write '{layer}:*' for every head "
                             f"or '{layer}' alone")
        heads = _parse_heads(heads_text, raw) if colon else None
        match = _RANGE.match(layer)
        if match:
            lo, hi = int(match["lo"]), int(match["hi"])
            if hi < lo:
                raise ValueError(f"layer range {layer!r} is empty (end < start)")
            entries.extend(HeadEntry(f"{match['prefix']}.{i}", heads) for i in range(lo, hi + 1))
        else:
            entries.append(HeadEntry(layer, heads))
    return entries


def resolve_heads(spec: str, attention_layers: dict[str, int], field: str = "heads") -> dict[str, tuple[int, ...]]:
    """Map a selection onto a model's attention layers.

    ``attention_layers`` maps every selectable layer name (as the user writes it) to its head count.
    Returns {layer name: sorted head indices}; entries naming the same layer are merged. Unknown
    layers and out-of-range heads raise ``ValueError`` listing what is valid.
    """
    selected: dict[str, set[int]] = {}
    for entry in parse_heads(spec, field):
        if entry.layer not in attention_layers:
            raise ValueError(f"{field}: no attention layer named {entry.layer!r}; valid layers: {_describe(attention_layers)}")
        n = attention_layers[entry.layer]
        heads = range(n) if entry.heads is None else entry.heads
        bad = [h for h in heads if h >= n]
        if bad:
            raise ValueError(f"{field}: layer {entry.layer!r} has heads 0-{n - 1}; got {bad}")
        selected.setdefault(entry.layer, set()).update(heads)
    return {layer: tuple(sorted(h)) for layer, h in selected.items()}


def _describe(attention_layers: dict[str, int]) -> str:
    """Compact listing: consecutive indices of one prefix collapse to ``prefix.lo-hi``."""
    groups: dict[str, list[int]] = {}
    others: list[str] = []
    for name in attention_layers:
        prefix, _, index = name.rpartition(".")
        if index.isdigit():
            groups.setdefault(prefix, []).append(int(index))
        else:
            others.append(name)
    parts = []
    for prefix, idx in groups.items():
        heads = {attention_layers[f"{prefix}.{i}"] for i in idx}
        count = f" ({heads.pop()} heads each)" if len(heads) == 1 else ""
        span = f"{min(idx)}-{max(idx)}" if len(idx) > 1 else str(idx[0])
        parts.append(f"{prefix}.{span}{count}")
    return ", ".join(parts + others)
