"""One transformers attention implementation for VLM text models, with ops per attention module.

``"mmattn"`` is registered with transformers' ``AttentionInterface`` (and its mask function with
``AttentionMaskInterface``). A text model switched to it runs, in each attention module, the ops added there:

* **observers** (``op.observe(module, query, key, value, attention_mask, kwargs)``) see the attention the
  layer computes: queries after RoPE, keys and values as cached, the layer's own mask (pruning's scorers);
* **modifiers** (``op.key_weights(module, query, key, attention_mask) -> (key_groups (B, Nk), weights)`` or
  None to leave the call as it is) reweight groups of keys: the keys of group g get weight w_g (a scalar or a tensor broadcastable to
  (B, Hq, Nq)), exactly, per (head, row), through ``kernels.grouped_attention`` (one running max, no N x N
  matrix): o = sum_g w_g acc_g / sum_g w_g mass_g. ``weights`` may also be a function of the attention itself,
  ``RowWeights(groups, fn)`` with ``fn(probs, lse) -> list``: ``probs`` (G, B, Hq, Nq) the share of each of the op's groups in each row and
  ``lse`` (B, Hq, Nq) the rows' log-normaliser, both as the earlier modifiers left them (VAR decides per row from
  its group masses). Several modifiers multiply their weights, in the order they were added;
* **row ops** (``op.replace_rows(module, query, key, value, attention_mask, out)``, in place on ``out`` (B, Nq,
  Hq, D)) recompute a few query rows themselves after the attention (PAI's generating row).

Without a modifier the call is transformers' SDPA attention exactly, so observers change nothing. Methods add
ops with :func:`add_op` after :func:`use` (which switches the text model to ``"mmattn"`` on first use and back
when the last user goes), so pruning, sinks and steering share one model.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import kernels
from ._compat import AttentionInterface, AttentionMaskInterface, sdpa_attention_forward, sdpa_mask
from .kernels import BlockMask

IMPLEMENTATION = "mmattn"
_OPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> [op]
_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [original implementation, op count]


def visible(mask: torch.Tensor) -> torch.Tensor:
    """A transformers attention mask as bool, True = visible (bool masks as they are; additive float masks:
    entries above half the dtype's minimum)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


# Masks from composable predicates over original token positions: ``predicate(q, k) -> bool`` with q (.., Nq, 1)
# and k (B, 1, Nk) broadcasting, as transformers composes its masks (causal, sliding window, padding).
def causal(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return k <= q


def sliding_window(size: int):
    """Keys within the last ``size`` positions up to the query (transformers' sliding-window layers)."""
    return lambda q, k: k > q - size


def not_padding(padding: torch.Tensor):
    """Keys whose position is a real token of the 2D (B, N) ``padding`` mask (1 = token, 0 = padding)."""
    real = padding.bool()
    return lambda q, k: real.gather(1, k[:, 0].expand(real.shape[0], -1))[:, None, :]


def position_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, *predicates) -> torch.Tensor:
    """(B, 1, Nq, Nk) bool: every predicate holds for (query position, key position); ``q_positions`` (Nq,) or
    (B, Nq), ``k_positions`` (B, Nk)."""
    q, k = q_positions[..., :, None], k_positions[:, None, :]
    if q.dim() == 2:
        q = q[None]
    allowed = predicates[0](q, k)
    for predicate in predicates[1:]:
        allowed = allowed & predicate(q, k)
    return allowed[:, None]


def dense_visibility(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
                     device) -> torch.Tensor:
    """(B or 1, 1, q_len, kv_len) bool visibility of one attention call: its mask, or with none (transformers
    then runs SDPA causally when q_len > 1) causal with the queries at the end of the keys."""
    if attention_mask is not None:
        return visible(attention_mask[:, :, :, :kv_len])
    if q_len == 1:
        return torch.ones(1, 1, 1, kv_len, dtype=torch.bool, device=device)
    rows = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]


def attention(module, query, key, value, attention_mask, **kwargs):
    """The "mmattn" attention implementation (transformers' calling convention)."""
    ops = _OPS.get(module, ())
    for op in ops:
        if hasattr(op, "observe"):
            op.observe(module, query, key, value, attention_mask, kwargs)
    reweights = [r for r in (op.key_weights(module, query, key, attention_mask) for op in ops
                             if hasattr(op, "key_weights")) if r is not None]
    if not reweights:  # no modifier, or every modifier leaves this call as it is
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    else:
        out, weights = _reweighted(query, key, value, attention_mask, reweights, kwargs)
    for op in ops:
        if hasattr(op, "replace_rows"):
            op.replace_rows(module, query, key, value, attention_mask, out)
    return out, weights


@dataclass(frozen=True)
class RowWeights:
    """Group weights decided from the attention itself: ``fn(probs, lse) -> [w_0, ..., w_{groups-1}]``."""

    groups: int
    fn: Callable

    def __len__(self) -> int:
        return self.groups


def _reweighted(query, key, value, attention_mask, reweights, kwargs):
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    seen = dense_visibility(attention_mask, batch, q_len, kv_len, query.device)
    combined, radices = None, []
    for g, w in reweights:  # one id per combination of the ops' groups (mixed radix), then only those present
        combined = g if combined is None else combined * len(w) + g
        radices.append(len(w))
    present, ids = torch.unique(combined, return_inverse=True)
    if len(present) > kernels.MAX_GROUPS:
        raise ValueError(f"the applied methods split this call's keys into {len(present)} groups; at most "
                         f"{kernels.MAX_GROUPS} can be reweighted together")
    block_mask, causal = _visibility_kind(seen.expand(batch, 1, q_len, kv_len))
    result = kernels.grouped_attention(query, key, value, ids.view(batch, kv_len), scale=kwargs.get("scaling"),
                                       block_mask=block_mask, causal=causal, num_groups=len(present))
    weights = [torch.ones((), device=query.device)] * len(present)
    for i, ((_, w), count) in enumerate(zip(reweights, radices)):  # in the order the ops were added
        digit = (present // math.prod(radices[i + 1:])) % count
        if isinstance(w, RowWeights):
            current = [weights[c] * result.mass[c] for c in range(len(present))]
            total = sum(current)
            probs = torch.stack([sum((current[c] for c in range(len(present)) if digit[c] == d),
                                     torch.zeros_like(total)) / torch.where(total > 0, total, 1.0)
                                 for d in range(count)])
            w = w.fn(probs, result.max + total.log())
        w = [torch.as_tensor(x, dtype=torch.float32, device=query.device) for x in w]
        weights = [weights[c] * w[int(digit[c])] for c in range(len(present))]
    out = result.combine(weights, query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _visibility_kind(seen: torch.Tensor) -> tuple[BlockMask | None, bool]:
    """(block mask, causal) for the kernels from a dense (B, 1, Nq, Nk) visibility: none where every key is seen
    (a decode step), plain causal where it is exactly causal (an unpadded prefill: the kernels then slice keys
    instead of gathering blocks), else the block mask."""
    if bool(seen.all()):
        return None, False
    q_len, kv_len = seen.shape[-2:]
    if q_len == kv_len and torch.equal(seen, torch.ones(q_len, kv_len, dtype=torch.bool,
                                                        device=seen.device).tril().expand_as(seen)):
        return None, True
    return BlockMask.from_dense(seen), False


AttentionInterface.register(IMPLEMENTATION, attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def check(model, method: str) -> None:
    """Refuse a text model that runs neither transformers' "sdpa" nor "mmattn" (``method`` names the caller)."""
    current = model.config.text_config._attn_implementation
    if current not in ("sdpa", IMPLEMENTATION):
        raise ValueError(f"{method} runs on the text model's 'sdpa' attention; {type(model).__name__} uses {current!r}")


def use(model, method: str):
    """Switch ``model``'s text model to "mmattn" (counted: the last undo switches it back). Returns undo."""
    check(model, method)
    if model not in _MODELS:
        original = model.config.text_config._attn_implementation
        model.set_attn_implementation({"text_config": IMPLEMENTATION})
        _MODELS[model] = [original, 0]
    _MODELS[model][1] += 1

    def undo() -> None:
        _MODELS[model][1] -= 1
        if _MODELS[model][1] == 0:
            model.set_attn_implementation({"text_config": _MODELS.pop(model)[0]})

    return undo


def add_op(module: torch.nn.Module, op):
    """Add ``op`` to attention ``module`` (of a text model switched by :func:`use`). Returns undo."""
    _OPS.setdefault(module, []).append(op)

    def undo() -> None:
        _OPS[module].remove(op)
        if not _OPS[module]:
            del _OPS[module]

    return undo
