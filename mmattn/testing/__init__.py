"""Offline factory of tiny, random-weight models of real architectures.

Every model here is built in code, with no network: configs, weights (seeded), tokenizers and
processors. They are addressable by name (``tiny/sd3``, ``tiny/llava``...) wherever mmattn accepts a
model id, so tests, benchmarks, the CLI and the demo run on a machine with no model hub.

    >>> from mmattn.testing import build_tiny
    >>> pipe = build_tiny("tiny/sd3")                   # a diffusers StableDiffusion3Pipeline
    >>> vlm = build_tiny("tiny/qwen2-vl")               # TinyVLM(model, processor)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["TinySpec", "TinyVLM", "TINY_MODELS", "register_tiny", "build_tiny", "tiny_names"]

# Modules that register builders; imported on first use so `import mmattn` stays light.
_FAMILY_MODULES = ("diffusion", "llava", "qwen_vl", "idefics", "gemma")

KINDS = ("image", "video", "vlm")


@dataclass(frozen=True)
class TinySpec:
    """One entry of the registry: ``kind`` is "image", "video" (diffusers pipelines) or "vlm"."""

    name: str
    kind: str
    architecture: str
    builder: Callable[..., Any]
    defaults: dict[str, Any] = field(default_factory=dict)


@dataclass
class TinyVLM:
    """A transformers vision-language model with the processor that feeds it."""

    model: Any
    processor: Any


TINY_MODELS: dict[str, TinySpec] = {}
_loaded = False


def register_tiny(name: str, kind: str, architecture: str, defaults: dict[str, Any] | None = None):
    """Decorator: register ``builder(dtype) -> pipeline | TinyVLM`` under ``name``.

    ``defaults`` are the call arguments that suit the tiny model (for pipelines: height, width,
    num_inference_steps, num_frames...); the CLI and pipelines use them when the user gives none.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")

    def decorator(builder):
        TINY_MODELS[name] = TinySpec(name, kind, architecture, builder, dict(defaults or {}))
        return builder

    return decorator


def _load_families() -> None:
    global _loaded
    if not _loaded:
        for module in _FAMILY_MODULES:
            importlib.import_module(f"{__name__}.{module}")
        _loaded = True


def tiny_names(kind: str | None = None) -> list[str]:
    """Names of the registered tiny models, optionally only those of one ``kind``."""
    _load_families()
    return sorted(n for n, s in TINY_MODELS.items() if kind is None or s.kind == kind)


def tiny_spec(name: str) -> TinySpec:
    _load_families()
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; available: {', '.join(tiny_names())}")
    return TINY_MODELS[name]


def build_tiny(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build the tiny model ``name`` with weights drawn from ``seed`` (same seed, same weights)."""
    spec = tiny_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return spec.builder(dtype=dtype)
