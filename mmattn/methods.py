"""Method configs by name, as timm registers models: ``get("softpag")``, ``list_methods("vlm")``, ``from_dict(d)``.

Every config class in :mod:`mmattn.configs` registers itself under its ``name``. ``from_dict(config.to_dict())``
gives back an equal config, so a ``settings.json`` reproduces the methods of a run exactly.
"""

from __future__ import annotations

import dataclasses
import math

from .configs import _REGISTRY, _Method

TARGETS = ("diffusion", "vlm")


def get(name: str) -> type:
    """The config class registered as ``name``."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; known methods: {', '.join(list_methods())}")
    return _REGISTRY[name]


def list_methods(target: str | None = None) -> list[str]:
    """Registered method names, sorted; only those for ``target`` ("diffusion" or "vlm") when given."""
    if target is not None and target not in TARGETS:
        raise ValueError(f"target={target!r}: expected one of {', '.join(TARGETS)}")
    return sorted(name for name, cls in _REGISTRY.items() if target is None or cls.applies_to == target)


def settings(name: str) -> list[dataclasses.Field]:
    """The fields of method ``name`` a user sets (with ``help`` / ``choices`` metadata), without the ones it fixes."""
    cls = get(name)
    return [f for f in dataclasses.fields(cls) if f.name not in cls.fixed]


def from_dict(data: dict) -> _Method:
    """The config that ``to_dict()`` described: ``{"method": name, **settings}``; non-finite numbers written as
    strings ("inf") are read back as floats."""
    if not isinstance(data, dict) or "method" not in data:
        raise ValueError(f"expected a dict with a 'method' key, as to_dict() writes; got {data!r}")
    cls = get(data["method"])
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known - {"method"}
    if unknown:
        raise ValueError(f"{data['method']}: unknown settings {sorted(unknown)}; expected some of {sorted(known)}")
    settings = {k: _number_or_string(v) for k, v in data.items() if k != "method"}
    return cls(**settings)


def _number_or_string(value):
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        parsed = float(value)
        return parsed if not math.isnan(parsed) else value
    return value
