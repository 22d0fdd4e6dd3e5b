"""Window attention in the core slot of the diffusion family processors (:mod:`mmattn.processors.diffusion`).

A :class:`WindowCore` replaces a layer's attention call. Per call it reads the layer's token layout from the
call itself (the image-token grid of the denoiser's input, downsampled to the layer's resolution; where text sits
in joint sequences: ``DiffusionFamily.text_first``), takes its cached plan (:func:`mmattn.windows.plan`) and runs
``kernels.attention`` with the plan's block mask. Outside the configured steps, or when the layer sees keys other
than its own sequence (cross-attention), it calls the original core. Guidance ops on the same layer run around it.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from mmattn.adapters import diffusion_family
from mmattn.api import installing, register_installer
from mmattn.guidance import GuidedDenoiser, step_index
from mmattn.heads import resolve_heads
from mmattn.processors.diffusion import FamilyProcessor, check_mirrored, family_processor, heads_first
from mmattn.windows import FreeSwim, WindowAttention, plan, windowed

VIDEO_FAMILIES = ("wan", "cogvideox", "ltx")
# Token layouts the window engine knows. Not yet: Qwen-Image and HunyuanVideo (their self-attention always carries
# a text padding mask), Sana (linear attention).
WINDOW_FAMILIES = ("unet", "sd3", "flux", "wan", "pixart", "cogvideox", "ltx", "hunyuandit")


def full_attention(q, k, v, scale: float) -> torch.Tensor:
    """FreeSwim's full branch with scaled logits, (B, H, N, D)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class WindowCore:
    """``core(query, key, value, attention_mask)`` of one layer's processor, windowed by ``config``
    (WindowAttention or FreeSwim); ``window_for(grid)`` gives the window of a call's grid, ``scaling(n_image)``
    the logits' factor (None: unscaled)."""

    def __init__(self, processor: FamilyProcessor, config, window_for, text_first: bool, video: bool,
                 scaling, dual: _DualPath | None = None):
        self.processor, self.config, self.window_for = processor, config, window_for
        self.text_first, self.video, self.scaling, self.dual = text_first, video, scaling, dual

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
        factor = self.scaling(n_image)
        scale = None if factor is None else factor / math.sqrt(q.shape[-1])
        if self.dual is not None and self.dual.recording:  # FreeSwim's full branch: dense, scaled as the window
            if scale is None:
                return self.processor.original_core(query, key, value, attention_mask)
            out = full_attention(q, k, v, scale)
        else:
            n_text = n - n_image
            before, after = (n_text, 0) if self.text_first else (0, n_text)
            window_plan = plan(self.window_for(grid), grid, before, after, text=self.config.text, device=q.device)
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
            raise ValueError(f"an image window cannot lay out this call's {frames} frames")
        grid = (frames, rows, cols) if self.video else (rows, cols)
        return grid, frames * rows * cols


def default_grid(pipe, family) -> tuple[int, int, int]:
    """(frames, rows, cols) of the image tokens at the pipeline's default call resolution (what it was trained at,
    as far as the pipeline knows): the ``height``/``width``/``num_frames`` defaults of its ``__call__``, or its
    default sample size."""
    defaults = {k: p.default for k, p in inspect.signature(type(pipe).__call__).parameters.items()}
    vae_factor = (getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None)
                  or getattr(pipe, "vae_spatial_compression_ratio", None) or 8)  # LTX: the last
    config = family.denoiser(pipe).config
    sample = getattr(pipe, "default_sample_size", None) or getattr(config, "sample_size", None)
    rows = getattr(config, "sample_height", None) or sample  # CogVideoX: sample_height, sample_width
    cols = getattr(config, "sample_width", None) or sample
    height = defaults.get("height") if isinstance(defaults.get("height"), int) else rows * vae_factor
    width = defaults.get("width") if isinstance(defaults.get("width"), int) else cols * vae_factor
    patch = getattr(config, "patch_size", None) or (2 if family.name == "flux" else 1)
    spatial = patch[-1] if isinstance(patch, (tuple, list)) else patch
    frames = 1
    if family.name in VIDEO_FAMILIES:
        count = defaults.get("num_frames") if isinstance(defaults.get("num_frames"), int) else 1
        temporal = getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_compression_ratio", 4)
        frames = (count - 1) // temporal + 1
    return frames, height // (vae_factor * spatial), width // (vae_factor * spatial)


class _DualPath:
    """FreeSwim's full-attention branch: on refresh steps the denoiser first runs once with dense attention (the
    original forward: no guidance rows) and each cross-attention module's output is kept; the windowed forwards
    until the next refresh use the kept outputs (rows a guidance method appended, copies of the cond rows, get the
    cond rows' outputs). With ``uncond="window"`` (the official cached variant) the CFG uncond pass keeps its own
    windowed cross-attention: Wan's separate uncond call runs no full branch, a batched [uncond, cond] call has
    only its cond rows replaced; with "full" every call and row is replaced (kept per call of the step)."""

    def __init__(self, pipe, guided: GuidedDenoiser, refresh_every: int, uncond: str):
        self.pipe, self.guided, self.refresh_every, self.uncond = pipe, guided, refresh_every, uncond
        self.recording, self.kept, self.step, self.call = False, {}, None, 0
        self.keep_rows = slice(None)  # the rows of this call the kept outputs replace

    def before_forward(self, module, args, kwargs):
        inputs = self.guided._signature.bind(*args, **kwargs).arguments
        step = step_index(self.pipe.scheduler, inputs.get("timestep", 0))
        self.call = self.call + 1 if step == self.step else 0
        self.step = step
        n = inputs[self.guided.family.batched_inputs[0]].shape[0]
        cfg, _ = self.guided._cfg(n)
        self.keep_rows = slice(None)
        if cfg and self.uncond == "window":
            if self.guided.family.cfg_calls == "separate":
                if self.call % 2 == 1:
                    self.keep_rows = None  # the uncond call: windowed only
                    return None
            else:
                self.keep_rows = slice(n // 2, None)  # [uncond, cond]: the cond rows (and appended copies)
        if step[0] % self.refresh_every == 0 or not any(key[0] == self.call for key in self.kept):
            self.guided._describe_call(inputs)  # the cores of the dense pass read the call's grid and step
            self.guided.info.step = step
            self.recording = True
            try:
                self.guided._forward(*args, **kwargs)  # dense: the cores see ``recording``
            finally:
                self.recording = False
        return None

    def cross_attention_hook(self, module, args, kwargs, output):
        key = (self.call, id(module))
        if self.recording:
            self.kept[key] = output
            return None
        kept = self.kept.get(key) if self.keep_rows is not None else None
        if kept is None:
            return output
        extra = output.shape[0] - kept.shape[0]
        if extra > 0:  # guidance rows appended after the n rows: copies of the last b (cond) rows per branch
            b = next((br.rows.stop - br.rows.start for br in self.guided.info.branches if br.rows is not None), extra)
            kept = torch.cat([kept] + [kept[kept.shape[0] - b:]] * (extra // b))
        if self.keep_rows == slice(None):
            return kept
        mixed = output.clone()
        mixed[self.keep_rows] = kept[self.keep_rows]
        return mixed


def _install_windows(pipe, config, make_window, dual: str = "off"):
    """Validate everything first (family, window rank, layers, processors), then set a window core on each
    selected layer's processor; each change's undo is registered as it is made. ``make_window(family, pipe)``
    returns ``window_for(grid)``; ``dual``: FreeSwim's dual path "on", "off" or "auto" (where the blocks have
    cross-attention)."""
    family = diffusion_family(pipe)
    if family.linear_attention:
        raise ValueError(f"{family.name}'s self-attention is linear (a ReLU kernel, no softmax): window attention "
                         "needs softmax attention")
    if family.name not in WINDOW_FAMILIES:
        raise ValueError(f"window attention supports {', '.join(WINDOW_FAMILIES)}; not {family.name} yet")
    video = family.name in VIDEO_FAMILIES
    stages = []  # (denoiser, its CFG scale argument, attention layers, cross-attention modules): Wan 2.2 has two
    for denoiser, cfg_scale in family.denoisers(pipe):
        attention = family.attention_layers(denoiser)
        names = list(attention) if config.layers == "*" else \
            list(resolve_heads(config.layers, {name: attn.heads for name, attn in attention.items()}, "layers"))
        check_mirrored(family, attention, names)
        for name in names:
            processor = attention[name].processor
            if isinstance(processor, FamilyProcessor) and processor.core is not None:
                raise ValueError(f"{name} already has a window method applied; remove() it first")
        blocks = family.blocks(denoiser)
        cross = {name: getattr(blocks[name], "attn2", None) for name in names}
        has_cross = all(isinstance(c, torch.nn.Module) for c in cross.values())
        if dual == "on" and not has_cross:
            raise ValueError(f"FreeSwim's dual path needs a cross-attention module (attn2) in every selected block; "
                             f"{family.name} has none: use dual_path='off'")
        dual = "on" if dual == "on" or (dual == "auto" and has_cross) else "off"
        stages.append((denoiser, cfg_scale, attention, cross))
    window_for = make_window(family, pipe)
    scaling = _scaling(config, getattr(config, "training_grid", None) or default_grid(pipe, family))
    with installing() as changes:
        for denoiser, cfg_scale, attention, cross in stages:
            guided = GuidedDenoiser.attach(pipe, family, denoiser, cfg_scale)
            changes.add(guided.release)
            guided.holders += 1
            changes.add(lambda g=guided: setattr(g, "holders", g.holders - 1))
            path = None
            if dual == "on":
                path = _DualPath(pipe, guided, config.refresh_every, config.uncond)
                changes.add(denoiser.register_forward_pre_hook(path.before_forward, with_kwargs=True).remove)
                for module in cross.values():
                    changes.add(module.register_forward_hook(path.cross_attention_hook, with_kwargs=True).remove)
            for name in cross:
                processor = family_processor(attention[name], family, guided.info, changes)
                processor.core = WindowCore(processor, config, window_for, family.text_first, video, scaling, path)
                changes.add(lambda p=processor: setattr(p, "core", None))
    return changes.undo


def _scaling(config, trained: tuple[int, int, int]):
    """The logits' factor as a function of the call's image-token count N (None: unscaled). Jin et al.'s
    sqrt(log N / log T) with T the training grid's tokens (or ``training_tokens``), or FreeSwim's official constant
    sqrt(log 2T / log T) with T one training frame's tokens."""
    if not config.entropy_scaling:
        return lambda n: None
    if getattr(config, "entropy_rule", "tokens") == "official":
        t = config.training_tokens or trained[1] * trained[2]
        factor = math.sqrt(math.log(2 * t) / math.log(t))
        return lambda n: factor
    t = config.training_tokens or math.prod(trained)
    return lambda n: math.sqrt(math.log(n) / math.log(t))


def _is_timm_vit(model) -> bool:
    return type(model).__module__.startswith("timm.") and hasattr(model, "patch_embed") and hasattr(model, "blocks")


class _ViTGrid:
    """The patch grid of a timm ViT's current input, read by a pre-hook on its patch embedding (the image's height
    and width), which every forward (``forward``, ``forward_features``, ``forward_intermediates``) calls."""

    def __init__(self, model):
        self.model, self.grid = model, None

    def __call__(self, module, args, kwargs):
        x = args[0] if args else kwargs["x"]
        patch = self.model.patch_embed.patch_size
        self.grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])


def _windowed_vit_forward(attention, window, grid: _ViTGrid, prefix: int, text: str):
    """A replacement for a timm ``Attention.forward`` (same signature): windows over the patch grid, the prefix
    tokens ([CLS], registers) seeing and seen by every token ("global")."""
    original = attention.forward

    def forward(x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal or attention.training or getattr(attention, "gate", None) is not None:
            return original(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        qkv = attention.qkv(x).reshape(b, n, 3, attention.num_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attention.q_norm(q), attention.k_norm(k)
        if math.prod(grid.grid) + prefix != n:
            raise ValueError(f"window attention: {n} tokens do not make {prefix} prefix tokens and the patch grid "
                             f"{grid.grid}")
        out = windowed(q, k, v, plan(window, grid.grid, before=prefix, text=text, device=x.device))
        out = attention.norm(out.transpose(1, 2).reshape(b, n, -1).to(x.dtype))
        return attention.proj_drop(attention.proj(out))

    return functools.update_wrapper(forward, original)


def _install_vit_windows(model, config: WindowAttention):
    """Window attention in every ``blocks.<i>.attn`` of a timm VisionTransformer (``layers``: "blocks.<i>")."""
    if config.window.ndim != 2:
        raise ValueError(f"{type(model).__name__} is an image model: it needs a Window2D; got "
                         f"{type(config.window).__name__}")
    attention = {f"blocks.{i}": block.attn for i, block in enumerate(model.blocks)}
    names = list(attention) if config.layers == "*" else \
        list(resolve_heads(config.layers, {name: a.num_heads for name, a in attention.items()}, "layers"))
    if config.steps != (0.0, 1.0) or config.entropy_scaling:
        raise ValueError("a timm ViT has no denoising steps or training-token scaling here: use steps=(0, 1) and "
                         "entropy_scaling=False")
    grid = _ViTGrid(model)
    prefix = getattr(model, "num_prefix_tokens", 1)
    with installing() as changes:
        changes.add(model.patch_embed.register_forward_pre_hook(grid, with_kwargs=True).remove)
        for name in names:
            module = attention[name]
            module.forward = _windowed_vit_forward(module, config.window, grid, prefix, config.text)
            changes.add(lambda m=module: m.__dict__.pop("forward", None))
    return changes.undo


@register_installer(WindowAttention)
def install_window_attention(pipe, config: WindowAttention):
    if _is_timm_vit(pipe):
        return _install_vit_windows(pipe, config)

    def make_window(family, pipe):
        rank = 3 if family.name in VIDEO_FAMILIES else 2
        if config.window.ndim != rank:
            kind = "a video (frames, rows, cols)" if rank == 3 else "an image (rows, cols)"
            raise ValueError(f"{type(pipe).__name__} is {kind} model: it needs a Window{rank}D; got "
                             f"{type(config.window).__name__}")
        return lambda grid: config.window

    return _install_windows(pipe, config, make_window)


@register_installer(FreeSwim)
def install_freeswim(pipe, config: FreeSwim):
    def make_window(family, pipe):
        video = family.name in VIDEO_FAMILIES
        if family.name == "unet":
            raise ValueError("FreeSwim sizes its window to one token grid; a UNet's blocks see several: use "
                             "WindowAttention with a Window2D instead")
        frames, rows, cols = config.training_grid or default_grid(pipe, family)
        trained = (frames, rows, cols) if video else (rows, cols)
        return lambda grid: config.window_of(trained, grid, video)

    return _install_windows(pipe, config, make_window, dual=config.dual_path)
