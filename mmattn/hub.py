"""Model loading by id: ``tiny/...`` names build offline models; anything else goes to from_pretrained.

A model that cannot be had offline fails with one ``ModelNotAvailableError`` line naming the id and
HF_HUB_OFFLINE, not a traceback from deep inside huggingface_hub.
"""

from __future__ import annotations

import os

import torch

from .testing import TinyVLM, build_tiny, tiny_names, tiny_spec


class ModelNotAvailableError(RuntimeError):
    """The model id is neither a tiny model, a local folder, nor in the local Hugging Face cache."""


def _not_available(model_id: str, error: Exception) -> ModelNotAvailableError:
    offline = os.environ.get("HF_HUB_OFFLINE", "unset")
    return ModelNotAvailableError(
        f"model {model_id!r} is not available offline (HF_HUB_OFFLINE={offline}): it is not a local folder "
        f"and not in the Hugging Face cache; tiny models built in code: {', '.join(tiny_names())} "
        f"[{type(error).__name__}]"
    )


def _tiny(model_id: str, kinds: tuple[str, ...], seed: int, dtype: torch.dtype):
    spec = tiny_spec(model_id)
    if spec.kind not in kinds:
        raise ValueError(f"model {model_id!r} is of kind {spec.kind!r}; this needs one of: {', '.join(kinds)}")
    return build_tiny(model_id, seed=seed, dtype=dtype)


def load_pipeline(model_id: str, dtype: torch.dtype = torch.float32, kinds=("image", "video"), seed: int = 0):
    """A diffusers pipeline: ``tiny/<name>`` built offline, else ``DiffusionPipeline.from_pretrained``."""
    if model_id.startswith("tiny/"):
        return _tiny(model_id, kinds, seed, dtype)
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.from_pretrained(model_id, dtype=dtype)
    except OSError as error:
        raise _not_available(model_id, error) from error


def load_vlm(model_id: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyVLM:
    """A transformers VLM with its processor: ``tiny/<name>`` built offline, else from_pretrained."""
    if model_id.startswith("tiny/"):
        return _tiny(model_id, ("vlm",), seed, dtype)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype)
    except OSError as error:
        raise _not_available(model_id, error) from error
    return TinyVLM(model.eval(), processor)


def pipeline_defaults(model_id: str) -> dict:
    """Call arguments that suit a model: the tiny registry's defaults, or none (the pipeline's own)."""
    return dict(tiny_spec(model_id).defaults) if model_id.startswith("tiny/") else {}
