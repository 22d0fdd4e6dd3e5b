"""Window attention in the core slot of the diffusion family processors (:mod:`mmattn.processors.diffusion`).

A :class:`WindowCore` replaces a layer's attention call. Per call it reads the layer's token layout from the
call itself (the image-token grid of the denoiser's input, downsampled to the layer's resolution; where text sits
in joint sequences: ``DiffusionFamily.text_first``), takes its cached plan (:func:`mmattn.windows.plan`) and runs
``kernels.attention`` with the plan's block mask. Outside the configured steps, or when the layer sees keys other
than its own sequence (cross-attention), it calls the original core. Guidance ops on the same layer run around it.
"""

from __future__ import annotations

import inspect
import math


from mmattn.adapters import diffusion_family
from mmattn.api import installing, register_installer
from mmattn.guidance import GuidedDenoiser
from mmattn.heads import resolve_heads
from mmattn.processors.diffusion import FamilyProcessor, check_mirrored, family_processor, heads_first
from mmattn.windows import WindowAttention, plan, windowed

VIDEO_FAMILIES = ("wan",)


class WindowCore:
    """``core(query, key, value, attention_mask)`` of one layer's processor, windowed by ``config``."""

    def __init__(self, processor: FamilyProcessor, config: WindowAttention, text_first: bool, video: bool,
                 training_tokens: int | None):
        self.processor, self.config, self.text_first, self.video = processor, config, text_first, video
        self.training_tokens = training_tokens

    def __call__(self, query, key, value, attention_mask):
        info = self.processor.info
        index, total = info.step
        start, stop = self.config.steps
        axis = self.processor.heads_axis
        sequence = 2 if axis == 1 else 1
        if not start <= index / total < stop or key.shape[sequence] != query.shape[sequence]:
            return self.processor.original_core(query, key, value, attention_mask)
        if attention_mask is not None:
            raise ValueError("window attention does not combine with an attention mask on self-attention; "
                             "call the pipeline without one or remove() the window method")
        q, k, v = (heads_first(t, axis) for t in (query, key, value))
        n = q.shape[2]
        grid, n_image = self._grid(n)
        n_text = n - n_image
        before, after = (n_text, 0) if self.text_first else (0, n_text)
        window_plan = plan(self.config.window, grid, before, after, text=self.config.text, device=q.device)
        scale = None
        if self.config.entropy_scaling:
            scale = math.sqrt(math.log(n_image) / math.log(self.training_tokens)) / math.sqrt(q.shape[-1])
        out = windowed(q, k, v, window_plan, scale).to(query.dtype)
        return out if axis == 1 else out.transpose(1, 2)

    def _grid(self, n: int) -> tuple[tuple[int, ...], int]:
        """The layer's image-token grid (2 axes, or 3 for video) and image-token count, from the call's layout."""
        info = self.processor.info
        try:
            frames, rows, cols = info.layer_grid(n)
        except ValueError:
            frames, rows, cols = info.layer_grid(n - info.text_tokens)
        if not self.video and frames != 1:
            raise ValueError(f"{type(self.config.window).__name__} is an image window; this call has {frames} frames")
        grid = (frames, rows, cols) if self.video else (rows, cols)
        return grid, frames * rows * cols


def default_tokens(pipe, family) -> int:
    """Image tokens at the pipeline's default call resolution (what it was trained at, as far as the pipeline
    knows): the ``height``/``width``/``num_frames`` defaults of its ``__call__``, or its default sample size."""
    defaults = {k: p.default for k, p in inspect.signature(type(pipe).__call__).parameters.items()}
    vae_factor = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", 8)
    sample = getattr(pipe, "default_sample_size", None) or getattr(family.denoiser(pipe).config, "sample_size", None)
    height = defaults.get("height") if isinstance(defaults.get("height"), int) else sample * vae_factor
    width = defaults.get("width") if isinstance(defaults.get("width"), int) else sample * vae_factor
    patch = getattr(family.denoiser(pipe).config, "patch_size", None) or (2 if family.name == "flux" else 1)
    spatial = patch[-1] if isinstance(patch, (tuple, list)) else patch
    tokens = (height // (vae_factor * spatial)) * (width // (vae_factor * spatial))
    if family.name in VIDEO_FAMILIES:
        frames = defaults.get("num_frames") if isinstance(defaults.get("num_frames"), int) else 1
        tokens *= (frames - 1) // getattr(pipe, "vae_scale_factor_temporal", 4) + 1
    return tokens


@register_installer(WindowAttention)
def install_windows(pipe, config: WindowAttention):
    """Validate everything first (family, window rank, layers, processors), then set the window core on each
    selected layer's processor; each change's undo is registered as it is made."""
    family = diffusion_family(pipe)
    video = family.name in VIDEO_FAMILIES
    rank = 3 if video else 2
    if config.window.ndim != rank:
        kind = "a video (frames, rows, cols)" if video else "an image (rows, cols)"
        raise ValueError(f"{type(pipe).__name__} is {kind} model: it needs a Window{rank}D; got "
                         f"{type(config.window).__name__}")
    denoiser = family.denoiser(pipe)
    attention = family.attention_layers(denoiser)
    names = list(attention) if config.layers == "*" else \
        list(resolve_heads(config.layers, {name: attn.heads for name, attn in attention.items()}, "layers"))
    check_mirrored(family, attention, names)
    for name in names:
        processor = attention[name].processor
        if isinstance(processor, FamilyProcessor) and processor.core is not None:
            raise ValueError(f"{name} already has a window method applied; remove() it first")
    training = config.training_tokens or (default_tokens(pipe, family) if config.entropy_scaling else None)
    with installing() as changes:
        guided = GuidedDenoiser.attach(pipe, family)
        changes.add(guided.release)
        guided.holders += 1
        changes.add(lambda: setattr(guided, "holders", guided.holders - 1))
        for name in names:
            processor = family_processor(attention[name], family, guided.info, changes)
            processor.core = WindowCore(processor, config, family.text_first, video, training)
            changes.add(lambda p=processor: setattr(p, "core", None))
    return changes.undo
