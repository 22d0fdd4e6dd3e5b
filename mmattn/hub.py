"""Model loading by id: ``tiny/...`` names build offline models; anything else goes to from_pretrained.

A model that cannot be had offline fails with one ``ModelNotAvailableError`` line naming the id and
HF_HUB_OFFLINE, not a traceback from deep inside huggingface_hub.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from .adapters import DIFFUSION_FAMILIES
from .testing import build_tiny, tiny_names, tiny_spec

VIDEO_DENOISERS = ("WanTransformer3DModel",)


class ModelNotAvailableError(RuntimeError):
    """The model id is neither a tiny model, a local folder, nor in the local Hugging Face cache."""


def _not_available(model_id: str, error: Exception, tiny: bool = True) -> ModelNotAvailableError:
    """``tiny``: name the tiny models that could stand in."""
    offline = os.environ.get("HF_HUB_OFFLINE", "unset")
    alternatives = f"; tiny models built in code: {', '.join(tiny_names())}" if tiny else ""
    return ModelNotAvailableError(
        f"model {model_id!r} is not available offline (HF_HUB_OFFLINE={offline}): it is not a local folder "
        f"and not in the Hugging Face cache{alternatives} [{type(error).__name__}]"
    )


def _check_kind(model_id: str, kind: str, kinds: tuple[str, ...]) -> None:
    if kind not in kinds:
        raise ValueError(f"model {model_id!r} is of kind {kind!r}; this needs one of: {', '.join(kinds)}")


def _tiny(model_id: str, kinds: tuple[str, ...], seed: int, dtype: torch.dtype):
    _check_kind(model_id, tiny_spec(model_id).kind, kinds)
    return build_tiny(model_id, seed=seed, dtype=dtype)


SHIPPED_PIPELINES = ("mmattn/shapes-t2i",)  # trained pipelines inside the package, loadable offline by name


def pipeline_kind(model_id: str) -> str:
    """The kind of a pipeline, image or video: from the tiny registry or its model_index.json (no weights load)."""
    if model_id in SHIPPED_PIPELINES:
        return "image"
    if model_id.startswith("tiny/"):
        return tiny_spec(model_id).kind
    if Path(model_id).is_dir() and not (Path(model_id) / "model_index.json").is_file():
        raise ValueError(f"model {model_id!r} is a folder without model_index.json: not a diffusers pipeline")
    from diffusers import DiffusionPipeline

    try:
        with warnings.catch_warnings():  # diffusers still passes huggingface_hub a deprecated argument here
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)
            index = DiffusionPipeline.load_config(model_id)
    except OSError as error:
        raise _not_available(model_id, error) from error
    denoisers = {index[attr][1] for attr in ("unet", "transformer") if isinstance(index.get(attr), list) and index[attr][1]}
    supported = {family.denoiser_class for family in DIFFUSION_FAMILIES}
    if not denoisers & supported:
        raise ValueError(f"model {model_id!r} ({index.get('_class_name')}) has denoiser {sorted(denoisers) or 'none'}; "
                         f"supported denoisers: {', '.join(sorted(supported))}")
    return "video" if denoisers & set(VIDEO_DENOISERS) else "image"


def load_pipeline(model_id: str, dtype: torch.dtype = torch.float32, kinds=("image", "video"), seed: int = 0,
                  device: str | torch.device = "cpu"):
    """A diffusers pipeline on ``device``: ``tiny/<name>`` built offline, else ``DiffusionPipeline.from_pretrained``.

    The kind is checked before any weights load."""
    _check_kind(model_id, pipeline_kind(model_id), tuple(kinds))
    if model_id in SHIPPED_PIPELINES:
        from .shapes import t2i

        return t2i.load().to(device=device, dtype=dtype)
    if model_id.startswith("tiny/"):
        return build_tiny(model_id, seed=seed, dtype=dtype).to(device)
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model_id, dtype=dtype)
    except OSError as error:
        raise _not_available(model_id, error) from error
    return pipe.to(device)


def load_clip(model_id: str):
    """(CLIPModel, CLIPProcessor) from a hub id in the cache or a local folder."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(model_id), CLIPProcessor.from_pretrained(model_id)
    except OSError as error:
        raise _not_available(model_id, error, tiny=False) from error


SHIPPED_VLMS = ("mmattn/shapes-vlm",)  # trained models inside the package, loadable offline by name


def load_vlm(model_id: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(model, processor) of a transformers VLM: ``mmattn/shapes-vlm`` (shipped weights) and ``tiny/<name>`` offline,
    else ``from_pretrained`` (a hub id in the cache or a local folder)."""
    if model_id in SHIPPED_VLMS:
        from .shapes import vlm

        shipped = vlm.load()
        return shipped.model.to(dtype), shipped.processor
    if model_id.startswith("tiny/"):
        tiny = _tiny(model_id, ("vlm",), seed, dtype)
        return tiny.model, tiny.processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_id)
        model = AutoModelForImageTextToText.from_pretrained(model_id, dtype=dtype)
    except OSError as error:
        raise _not_available(model_id, error) from error
    return model.eval(), processor


def pipeline_defaults(model_id: str) -> dict:
    """Call arguments that suit a model: shapes-t2i's or the tiny registry's defaults, or none (the pipeline's own)."""
    if model_id in SHIPPED_PIPELINES:
        from .shapes import t2i

        return dict(t2i.CALL_DEFAULTS)
    return dict(tiny_spec(model_id).defaults) if model_id.startswith("tiny/") else {}


def default_prompt(model_id: str) -> str:
    """A prompt the model can draw: a shapes-world caption for shapes-t2i, else a photograph."""
    if model_id in SHIPPED_PIPELINES:
        return "a red circle left of a blue square"
    return "a photograph of a lighthouse on a cliff at sunset"
