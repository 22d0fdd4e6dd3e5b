"""Head-level perturbation processors (SoftPAG / PAG / SoftUG, SEG, STG) and block skips (SLG, STG).

One processor class per diffusers attention family mirrors the original's computation exactly and
applies *ops* to the rows of perturbed branches (``Branch.rows``): query ops before attention (SEG's
blur), output ops after it (SoftPAG's blend). Several methods can share a layer; each is one op.

SoftPAG's blend needs no kernel: with ``A' = (1-u)·A + u·I`` and ``I·V = V``, a head's output is
``(1-u)·attn(Q,K,V) + u·V``; the uniform target gives ``(1-u)·attn + u·mean_k(V)``. Families whose
originals call ``dispatch_attention_fn`` (Flux, Wan) keep doing so, with the user's backend choice.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmattn._compat import MIRRORED_PROCESSORS, apply_rotary_emb, dispatch_attention_fn
from mmattn.adapters import diffusion_family
from mmattn.api import installing, register_installer
from mmattn.configs import PAG, SEG, SLG, STG, SoftPAG
from mmattn.guidance import Branch, CallInfo, GuidedDenoiser
from mmattn.heads import resolve_heads


@dataclass(eq=False)
class HeadOp:
    """One method acting in one layer on one branch's rows and some heads.

    kind "blend": out ← (1-u)·out + u·target, target "identity" (V), "uniform" (mean V) or
    "image_block" (SD3 image×image identity); kind "blur": image-token queries blurred with sigma.
    """

    branch: Branch
    heads: torch.Tensor
    kind: str
    strength: float = 1.0
    target: str = "identity"
    sigma: float = 0.0


def _heads_axis_first(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A (B, H, N, D) view of ``x`` whose heads are on axis ``head_dim`` (1 or 2)."""
    return x if head_dim == 1 else x.transpose(1, 2)


def blend(out: torch.Tensor, value: torch.Tensor, op: HeadOp, head_dim: int = 1) -> None:
    """In place on ``out``: the op's rows and heads become (1-u)·out + u·target(V)."""
    out, value = _heads_axis_first(out, head_dim), _heads_axis_first(value, head_dim)
    rows, heads = op.branch.rows, op.heads.to(out.device)
    v = value[rows][:, heads]
    if op.target == "uniform":
        v = v.mean(dim=2, keepdim=True)
    o = out[rows][:, heads]
    out[rows, heads] = torch.lerp(o, v.to(o.dtype).expand_as(o), op.strength)


def gaussian_blur_tokens(x: torch.Tensor, grid: tuple[int, int, int], sigma: float) -> torch.Tensor:
    """Blur (B, H, N, D) tokens laid out row-major as (frames, rows, cols) over rows and cols.

    Separable Gaussian, kernel ceil(6σ) rounded up to odd and clipped to the grid, reflect padding;
    σ = inf gives the mean over each frame.
    """
    b, h, n, d = x.shape
    frames, rows, cols = grid
    x = x.reshape(b * h, frames, rows, cols, d)
    if math.isinf(sigma):
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).reshape(b, h, n, d)
    planes = x.permute(0, 1, 4, 2, 3).reshape(-1, 1, rows, cols)  # one plane per (head, frame, channel)
    for axis, length in ((2, rows), (3, cols)):
        size = min(math.ceil(6 * sigma) | 1, 2 * length - 1)
        radius = size // 2
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        kernel = (taps / taps.sum()).to(planes.dtype)
        if radius:
            pad = (0, 0, radius, radius) if axis == 2 else (radius, radius, 0, 0)
            padded = F.pad(planes, pad, mode="reflect")  # radius < length by the clip above
            weight = kernel.view(1, 1, -1, 1) if axis == 2 else kernel.view(1, 1, 1, -1)
            planes = F.conv2d(padded, weight)
    x = planes.reshape(b * h, frames, d, rows, cols).permute(0, 1, 3, 4, 2)
    return x.reshape(b, h, n, d)


def layer_grid(info: CallInfo, n_tokens: int) -> tuple[int, int, int]:
    """The (frames, rows, cols) of a layer's ``n_tokens`` image tokens: the call's grid downsampled."""
    if info.token_grid is None:
        raise ValueError("SEG needs the image token grid, which this call does not reveal")
    frames, rows, cols = info.token_grid
    for factor in (1, 2, 4, 8, 16, 32, 64):
        grid = (frames, -(-rows // factor), -(-cols // factor))
        if grid[0] * grid[1] * grid[2] == n_tokens:
            return grid
    raise ValueError(f"cannot lay {n_tokens} image tokens on a grid derived from {info.token_grid}")


class _PerturbedProcessor:
    """Common part: the original processor, the ops on this layer, and the call's information."""

    def __init__(self, original, info: CallInfo):
        self.original, self.info, self.ops = original, info, []

    def _active(self, kind: str):
        return [op for op in self.ops if op.kind == kind and op.branch.rows is not None]

    def perturb_query(self, query: torch.Tensor, image: slice, head_dim: int = 1) -> torch.Tensor:
        """SEG: blur the image-token queries of each blur op's rows and heads."""
        ops = self._active("blur")
        if not ops:
            return query
        query = query.clone()
        q = _heads_axis_first(query, head_dim)
        for op in ops:
            rows, heads = op.branch.rows, op.heads.to(q.device)
            selected = q[rows][:, heads]
            tokens = selected[:, :, image]
            selected[:, :, image] = gaussian_blur_tokens(tokens, layer_grid(self.info, tokens.shape[2]), op.sigma)
            q[rows, heads] = selected
        return query

    def perturb_output(self, out, query, key, value, head_dim: int = 1, n_image: int | None = None) -> None:
        """SoftPAG / PAG / STG-attention: blend each op's rows and heads toward its target."""
        for op in self._active("blend"):
            if op.target == "image_block":
                _blend_image_block(out, query, key, value, op, n_image)
            else:
                blend(out, value, op, head_dim)


class PerturbedAttnProcessor(_PerturbedProcessor):
    """diffusers' ``AttnProcessor2_0`` self-attention (SD/SDXL UNet, PixArt ``attn1``) plus perturbation ops."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, length = context.shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query = self.perturb_query(query, slice(None))

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        self.perturb_output(out, query, key, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PerturbedJointAttnProcessor(_PerturbedProcessor):
    """diffusers' ``JointAttnProcessor2_0`` (SD3 joint [image, text] attention) plus perturbation ops.

    Blend targets act over the whole joint sequence of the perturbed rows, except "image_block":
    image queries attend to themselves and to all text keys (the image×image block becomes the
    identity, as in diffusers' SD3 PAG), text rows unchanged.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        batch, n_image = hidden_states.shape[:2]

        def heads_first(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        query, key, value = (heads_first(p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            q_ctx, k_ctx, v_ctx = (heads_first(p(encoder_hidden_states)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                q_ctx = attn.norm_added_q(q_ctx)
            if attn.norm_added_k is not None:
                k_ctx = attn.norm_added_k(k_ctx)
            query, key, value = torch.cat([query, q_ctx], 2), torch.cat([key, k_ctx], 2), torch.cat([value, v_ctx], 2)
        query = self.perturb_query(query, slice(0, n_image))

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        self.perturb_output(out, query, key, value, n_image=n_image)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)

        if encoder_hidden_states is not None:
            out, ctx = out[:, :n_image], out[:, n_image:]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, ctx) if encoder_hidden_states is not None else out


class _DispatchBackend:
    """Flux / Wan: the attention backend and parallel config live on the original processor, read at call time, so
    a ``set_attention_backend(...)`` made while a method is applied reaches it and survives ``remove()``."""

    @property
    def _attention_backend(self):
        return getattr(self.original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value) -> None:
        self.original._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self.original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value) -> None:
        self.original._parallel_config = value


class PerturbedFluxAttnProcessor(_DispatchBackend, _PerturbedProcessor):
    """diffusers' ``FluxAttnProcessor`` ([text, image] double-stream, pre-concatenated single-stream) plus perturbation ops."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            if attn.fused_projections:
                ctx = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                ctx = (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states), attn.add_v_proj(encoder_hidden_states))
            q_ctx, k_ctx, v_ctx = (t.unflatten(-1, (-1, attn.head_dim)) for t in ctx)
            query = torch.cat([attn.norm_added_q(q_ctx), query], dim=1)
            key = torch.cat([attn.norm_added_k(k_ctx), key], dim=1)
            value = torch.cat([v_ctx, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        query = self.perturb_query(query, slice(self.info.text_tokens, None), head_dim=2)

        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        self.perturb_output(out, query, key, value, head_dim=2)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        n_text = encoder_hidden_states.shape[1]
        ctx, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(ctx.contiguous())


class PerturbedWanAttnProcessor(_DispatchBackend, _PerturbedProcessor):
    """diffusers' ``WanAttnProcessor`` self-attention (``attn1``, 3D RoPE) plus perturbation ops."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)
        query = self.perturb_query(query, slice(None), head_dim=2)

        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        self.perturb_output(out, query, key, value, head_dim=2)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _blend_image_block(out, query, key, value, op: HeadOp, n_image: int) -> None:
    """Image queries of the op's rows and heads: (1-u)·attn + u·attn(self ∪ text keys), in place.

    Computed from the self score and the image×text scores with one shared max: no N×N matrix.
    """
    rows, heads = op.branch.rows, op.heads.to(out.device)
    q, k, v = (t[rows][:, heads] for t in (query, key, value))
    q_img, k_img, v_img = q[:, :, :n_image], k[:, :, :n_image], v[:, :, :n_image]
    k_txt, v_txt = k[:, :, n_image:], v[:, :, n_image:]
    scale = q.shape[-1] ** -0.5
    s_self = (q_img * k_img).sum(-1, keepdim=True) * scale
    s_txt = q_img @ k_txt.transpose(-1, -2) * scale
    m = torch.maximum(s_self, s_txt.amax(-1, keepdim=True))
    w_self, w_txt = torch.exp(s_self - m), torch.exp(s_txt - m)
    o = (w_self * v_img + w_txt @ v_txt) / (w_self + w_txt.sum(-1, keepdim=True))
    current = out[rows][:, heads]
    current[:, :, :n_image] = torch.lerp(current[:, :, :n_image], o.to(out.dtype), op.strength)
    out[rows, heads] = current


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding on (B, N, H, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


PROCESSORS = {
    "unet": PerturbedAttnProcessor,
    "pixart": PerturbedAttnProcessor,
    "sd3": PerturbedJointAttnProcessor,
    "flux": PerturbedFluxAttnProcessor,
    "wan": PerturbedWanAttnProcessor,
}


def _skip_block_hook(family, branch: Branch):
    """Forward hook: the branch's rows of each block output become the block's matching input."""

    def hook(module, args, kwargs, output):
        if branch.rows is None:
            return output
        inputs = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        outputs = output if isinstance(output, tuple) else (output,)
        skipped = []
        for name, out in zip(family.block_outputs, outputs):
            x = inputs.get(name)
            if out is not None and isinstance(x, torch.Tensor):
                out = out.clone()
                out[branch.rows] = x[branch.rows].to(out.dtype)
            skipped.append(out)
        return tuple(skipped) if isinstance(output, tuple) else skipped[0]

    return hook


def install_perturbation(pipe, spec: str, branch: Branch, make_op=None, skip_blocks: bool = False,
                         field: str = "heads"):
    """Validate, then add one guidance branch: head ops on the selected layers and/or block skips.

    ``make_op(branch, heads) -> HeadOp`` builds the op for one layer's selected heads. A selected layer whose
    processor is not the diffusers processor ours mirrors (a user's own, an IP-Adapter's) is refused: its
    unperturbed rows could not go through it unchanged. Each change's undo is registered as it is made, so
    a failure at any step leaves the pipeline as it was. Returns undo.
    """
    family = diffusion_family(pipe)
    denoiser = family.denoiser(pipe)
    attention = family.attention_layers(denoiser)
    selection = resolve_heads(spec, {name: attn.heads for name, attn in attention.items()}, field)
    if not selection:
        raise ValueError(f"{field}={spec!r} selects no layer")
    if make_op is not None:
        mirrored = MIRRORED_PROCESSORS[family.name][1]
        for name in selection:
            processor = attention[name].processor
            if not isinstance(processor, _PerturbedProcessor) and type(processor).__name__ != mirrored:
                raise ValueError(f"{name} uses {type(processor).__name__}, which mmattn cannot perturb without "
                                 f"bypassing it (it mirrors diffusers' {mirrored}); select other layers or set "
                                 f"that layer's processor back to {mirrored}")
    with installing() as changes:
        guided = GuidedDenoiser.attach(pipe, family)
        changes.add(guided.release)
        guided.add_branch(branch)
        changes.add(lambda: guided.info.branches.remove(branch))
        blocks = family.blocks(denoiser)
        for name, heads in selection.items():
            if make_op is not None:
                attn = attention[name]
                if not isinstance(attn.processor, _PerturbedProcessor):
                    original = attn.processor
                    attn.set_processor(PROCESSORS[family.name](original, guided.info))
                    changes.add(functools.partial(_restore_processor, attn, original))
                op = make_op(branch, torch.tensor(heads, dtype=torch.long))
                attn.processor.ops.append(op)
                changes.add(functools.partial(attn.processor.ops.remove, op))
            if skip_blocks:
                hook = blocks[name].register_forward_hook(_skip_block_hook(family, branch), with_kwargs=True)
                changes.add(hook.remove)
    return changes.undo


def _restore_processor(attn, original) -> None:
    """Put the original processor back once no op is left on the layer."""
    if not attn.processor.ops:
        attn.set_processor(original)


@register_installer(PAG)
@register_installer(SoftPAG)
def install_softpag(pipe, config: SoftPAG):
    if config.scope == "image" and diffusion_family(pipe).name != "sd3":
        raise ValueError(f"scope={config.scope!r} is supported on sd3 only; this pipeline is {diffusion_family(pipe).name}")
    target = "image_block" if config.scope == "image" else config.target
    return install_perturbation(pipe, config.heads, Branch(config.scale, config.start, config.stop),
                                lambda branch, heads: HeadOp(branch, heads, "blend", config.strength, target))


@register_installer(SEG)
def install_seg(pipe, config: SEG):
    return install_perturbation(pipe, config.heads, Branch(config.scale, config.start, config.stop),
                                lambda branch, heads: HeadOp(branch, heads, "blur", sigma=config.sigma))


@register_installer(SLG)
def install_slg(pipe, config: SLG):
    return install_perturbation(pipe, config.layers, Branch(config.scale, config.start, config.stop), skip_blocks=True,
                                field="layers")


@register_installer(STG)
def install_stg(pipe, config: STG):
    branch = Branch(config.scale, config.start, config.stop, config.rescale)
    if config.mode == "residual":
        return install_perturbation(pipe, config.layers, branch, skip_blocks=True, field="layers")
    return install_perturbation(pipe, config.layers, branch, lambda b, heads: HeadOp(b, heads, "blend", 1.0, "identity"),
                                field="layers")
