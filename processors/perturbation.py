"""Head-level perturbation processors (SoftPAG / PAG / SoftUG), one per diffusers attention family.

SoftPAG's blend needs no kernel: with ``A' = (1-u)·A + u·I`` and ``I·V = V``, a head's output is
``(1-u)·attn(Q,K,V) + u·V``; the uniform target gives ``(1-u)·attn + u·mean_k(V)``. The blend acts
on the fused attention output of the perturbed batch rows only (``PerturbationState.rows``); other
rows and heads keep the exact computation of the processor they replace. Families whose originals
call ``dispatch_attention_fn`` (Flux, Wan) keep doing so, with the user's backend choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from mmattn.adapters import diffusion_family
from mmattn.api import register_installer
from mmattn.configs import PAG, SoftPAG
from mmattn.guidance import GuidedDenoiser, PerturbationState
from mmattn.heads import resolve_heads


def blend_heads(out: torch.Tensor, value: torch.Tensor, state: PerturbationState, heads: torch.Tensor,
                strength: float, target: str, head_dim: int = 1) -> None:
    """In place on ``out``: perturbed rows, selected heads become (1-u)·out + u·target(V).

    ``head_dim`` is the axis of heads: 1 for (B, H, N, D), 2 for (B, N, H, D).
    """
    if state.rows is None or strength == 0.0:
        return
    if head_dim == 2:
        out, value = out.transpose(1, 2), value.transpose(1, 2)  # views: writes land in the original
    heads = heads.to(out.device)
    v = value[state.rows][:, heads]
    if target == "uniform":
        v = v.mean(dim=2, keepdim=True)
    o = out[state.rows][:, heads]
    out[state.rows, heads] = torch.lerp(o, v.to(o.dtype).expand_as(o), strength)


class _SoftPAGProcessor:
    """Common state: selected heads, blend strength u, target, and the model's shared state."""

    def __init__(self, heads: tuple[int, ...], strength: float, target: str, state: PerturbationState, original=None):
        self.heads = torch.tensor(heads, dtype=torch.long)
        self.strength, self.target, self.state = strength, target, state
        # dispatch-based families: keep the attention backend the user chose on the original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def blend(self, out, value, head_dim=1):
        blend_heads(out, value, self.state, self.heads, self.strength, self.target, head_dim)


class SoftPAGAttnProcessor(_SoftPAGProcessor):
    """diffusers' ``AttnProcessor2_0`` self-attention (SD/SDXL UNet, PixArt ``attn1``) plus SoftPAG."""

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

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        self.blend(out, value)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class SoftPAGJointAttnProcessor(_SoftPAGProcessor):
    """diffusers' ``JointAttnProcessor2_0`` (SD3 joint [image, text] attention) plus SoftPAG.

    ``scope="joint"``: the target acts over the whole joint sequence of the perturbed rows.
    ``scope="image"``: image queries attend to themselves and to all text keys (the image×image
    block becomes the identity, as in diffusers' SD3 PAG); computed from the self score and the
    image×text scores with one shared max, never an N×N matrix. Text rows are unchanged.
    """

    def __init__(self, *args, scope: str = "joint", **kwargs):
        super().__init__(*args, **kwargs)
        self.scope = scope

    def blend_image_block(self, out, query, key, value, n_image):
        """Perturbed rows, selected heads, image queries: (1-u)·attn + u·attn(self ∪ text keys)."""
        if self.state.rows is None or self.strength == 0.0:
            return
        rows, heads = self.state.rows, self.heads.to(out.device)
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
        current[:, :, :n_image] = torch.lerp(current[:, :, :n_image], o.to(out.dtype), self.strength)
        out[rows, heads] = current

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

        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        if self.scope == "image" and encoder_hidden_states is not None:
            self.blend_image_block(out, query, key, value, n_image)
        else:
            self.blend(out, value)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)

        if encoder_hidden_states is not None:
            out, ctx = out[:, :n_image], out[:, n_image:]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, ctx) if encoder_hidden_states is not None else out


class SoftPAGFluxAttnProcessor(_SoftPAGProcessor):
    """diffusers' ``FluxAttnProcessor`` ([text, image] double-stream, pre-concatenated single-stream) plus SoftPAG."""

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

        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        self.blend(out, value, head_dim=2)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        n_text = encoder_hidden_states.shape[1]
        ctx, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(ctx.contiguous())


class SoftPAGWanAttnProcessor(_SoftPAGProcessor):
    """diffusers' ``WanAttnProcessor`` self-attention (``attn1``, 3D RoPE) plus SoftPAG."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)

        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                    backend=self._attention_backend, parallel_config=self._parallel_config)
        self.blend(out, value, head_dim=2)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding on (B, N, H, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


PROCESSORS = {
    "unet": SoftPAGAttnProcessor,
    "pixart": SoftPAGAttnProcessor,
    "sd3": SoftPAGJointAttnProcessor,
    "flux": SoftPAGFluxAttnProcessor,
    "wan": SoftPAGWanAttnProcessor,
}


@register_installer(PAG)
@register_installer(SoftPAG)
def install_softpag(pipe, config: SoftPAG):
    """Swap the selected layers' processors and wrap the denoiser for the guidance term."""
    family = diffusion_family(pipe)
    denoiser = family.denoiser(pipe)
    layers = family.attention_layers(denoiser)
    selection = resolve_heads(config.heads, {name: attn.heads for name, attn in layers.items()})
    if isinstance(denoiser.__dict__.get("forward"), GuidedDenoiser):
        raise ValueError("a perturbation-guidance method is already applied to this pipeline; remove() it first")
    if config.scope != "joint" and family.name != "sd3":
        raise ValueError(f"scope={config.scope!r} is supported on sd3 only; this pipeline is {family.name}")

    state = PerturbationState()
    originals = {name: layers[name].processor for name in selection}
    extra = {"scope": config.scope} if family.name == "sd3" else {}
    for name, heads in selection.items():
        layers[name].set_processor(PROCESSORS[family.name](heads, config.strength, config.target, state, originals[name], **extra))
    wrapper = GuidedDenoiser(pipe, denoiser, family, state, config.scale, config.start, config.stop)

    def undo() -> None:
        wrapper.restore()
        for name, processor in originals.items():
            layers[name].set_processor(processor)

    return undo
