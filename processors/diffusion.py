"""One attention processor per diffusers attention family, with three slots for what methods change.

Each processor mirrors the computation of the diffusers processor it replaces (``mmattn._compat.MIRRORED_PROCESSORS``)
and runs, in this order:

1. **query ops** (``op.on_query``, in the order the ops were added): e.g. SEG's blur of image-token queries;
2. the **core**: the attention call itself, by default the original's own (``F.scaled_dot_product_attention``,
   or ``dispatch_attention_fn`` with the backend the user chose, read from the original processor at call time);
   a method may set ``processor.core`` (e.g. window attention), with the original's signature
   ``core(query, key, value, attention_mask) -> out``;
3. **output ops** (``op.on_output``, in order): e.g. SoftPAG's blend toward V.

Tensors reach the ops as the family lays them out: heads on axis ``processor.heads_axis`` (1: (B, H, N, D), the
SDPA families; 2: (B, N, H, D), the dispatch families). With no op and no core the processor computes exactly
what the original does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import functools

from mmattn._compat import (
    MIRRORED_PROCESSORS,
    apply_rotary_emb,
    apply_rotary_emb_qwen,
    dispatch_attention_fn,
    ltx_rotary,
)
from mmattn.guidance import CallInfo


def heads_first(x: torch.Tensor, heads_axis: int) -> torch.Tensor:
    """A (B, H, N, D) view of ``x`` whose heads are on axis ``heads_axis`` (1 or 2)."""
    return x if heads_axis == 1 else x.transpose(1, 2)


def _heads_normed(attn, query, key, value, batch: int, head_dim: int):
    """(B, H, N, D) query, key and value from the projections, then the module's ``norm_q`` / ``norm_k``."""
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def text_qkv(attn, context: torch.Tensor, split) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text stream's query, key and value in joint attention: ``add_{q,k,v}_proj``, split into heads by
    ``split``, then ``norm_added_q`` / ``norm_added_k`` where the module has them."""
    query, key, value = (split(p(context)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if attn.norm_added_q is not None:
        query = attn.norm_added_q(query)
    if attn.norm_added_k is not None:
        key = attn.norm_added_k(key)
    return query, key, value


class FamilyProcessor:
    """Common part: the original processor, the ops on this layer, the call's information and the core slot."""

    heads_axis = 1
    text_first = False  # joint attention: text tokens before the image tokens (Flux)

    def __init__(self, original, info: CallInfo):
        self.original, self.info, self.ops = original, info, []
        self.core = None  # None: the original's attention call

    def attend(self, query, key, value, attention_mask):
        core = self.core or self.original_core
        return core(query, key, value, attention_mask)

    def original_core(self, query, key, value, attention_mask):
        raise NotImplementedError

    def query_ops(self, query: torch.Tensor, image: slice) -> torch.Tensor:
        """Each op's query step in turn (``image``: the image tokens' slice of the sequence)."""
        for op in self.ops:
            query = op.on_query(self, query, image)
        return query

    def output_ops(self, out, query, key, value, n_image: int) -> None:
        """Each op's output step in turn, in place on ``out`` (``n_image``: image tokens first in joint SD3)."""
        for op in self.ops:
            op.on_output(self, out, query, key, value, n_image)


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


class AttnProcessor(FamilyProcessor):
    """diffusers' ``AttnProcessor2_0`` self-attention (SD/SDXL UNet, PixArt ``attn1``) with op slots."""

    heads_axis = 1

    def original_core(self, query, key, value, attention_mask):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        return self.run(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def run(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb=None):
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
        query, key, value = _heads_normed(attn, query, key, value, batch, head_dim)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            if not attn.is_cross_attention:
                key = apply_rotary_emb(key, image_rotary_emb)
        query = self.query_ops(query, slice(None))
        out = self.attend(query, key, value, attention_mask)
        self.output_ops(out, query, key, value, n_image=query.shape[2])
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class HunyuanAttnProcessor(AttnProcessor):
    """diffusers' ``HunyuanAttnProcessor2_0`` (HunyuanDiT ``attn1``: ``AttnProcessor2_0`` plus 2-D RoPE) with op
    slots."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 image_rotary_emb=None):
        return self.run(attn, hidden_states, encoder_hidden_states, attention_mask, temb, image_rotary_emb)


class JointAttnProcessor(FamilyProcessor):
    """diffusers' ``JointAttnProcessor2_0`` (SD3 joint [image, text] attention) with op slots.

    Blend targets act over the whole joint sequence of the perturbed rows, or over one block of it (a SoftPAG
    scope: ``mmattn.processors.perturbation._blend_scope``).
    """

    heads_axis = 1

    def original_core(self, query, key, value, attention_mask):
        return F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)

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
            q_ctx, k_ctx, v_ctx = text_qkv(attn, encoder_hidden_states, heads_first)
            query, key, value = torch.cat([query, q_ctx], 2), torch.cat([key, k_ctx], 2), torch.cat([value, v_ctx], 2)
        query = self.query_ops(query, slice(0, n_image))
        out = self.attend(query, key, value, None)
        self.output_ops(out, query, key, value, n_image=n_image)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)

        if encoder_hidden_states is not None:
            out, ctx = out[:, :n_image], out[:, n_image:]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, ctx) if encoder_hidden_states is not None else out


class FluxAttnProcessor(_DispatchBackend, FamilyProcessor):
    """diffusers' ``FluxAttnProcessor`` ([text, image] double-stream, pre-concatenated single-stream) with op slots."""

    heads_axis = 2
    text_first = True

    def original_core(self, query, key, value, attention_mask):
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                     parallel_config=self._parallel_config)

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
        query = self.query_ops(query, slice(self.info.text_tokens, None))
        out = self.attend(query, key, value, attention_mask)
        self.output_ops(out, query, key, value, n_image=query.shape[1] - self.info.text_tokens)
        out = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out
        n_text = encoder_hidden_states.shape[1]
        ctx, out = out.split_with_sizes([n_text, out.shape[1] - n_text], dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(ctx.contiguous())


class WanAttnProcessor(_DispatchBackend, FamilyProcessor):
    """diffusers' ``WanAttnProcessor`` self-attention (``attn1``, 3D RoPE) with op slots."""

    heads_axis = 2

    def original_core(self, query, key, value, attention_mask):
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=self._parallel_config)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)
        query = self.query_ops(query, slice(None))
        out = self.attend(query, key, value, attention_mask)
        self.output_ops(out, query, key, value, n_image=query.shape[1])
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class CogVideoXAttnProcessor(FamilyProcessor):
    """diffusers' ``CogVideoXAttnProcessor2_0`` (joint [text, video] self-attention, 3-D RoPE on the video tokens)
    with op slots; returns (video, text) as the original does."""

    heads_axis = 1
    text_first = True

    def original_core(self, query, key, value, attention_mask):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                              is_causal=False)

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        n_text = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch, length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = _heads_normed(attn, query, key, value, batch, head_dim)
        if image_rotary_emb is not None:
            query[:, :, n_text:] = apply_rotary_emb(query[:, :, n_text:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, n_text:] = apply_rotary_emb(key[:, :, n_text:], image_rotary_emb)
        query = self.query_ops(query, slice(n_text, None))
        out = self.attend(query, key, value, attention_mask)
        self.output_ops(out, query, key, value, n_image=length - n_text)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        out = attn.to_out[1](attn.to_out[0](out))
        ctx, out = out.split([n_text, length - n_text], dim=1)
        return out, ctx


class SanaLinearAttnProcessor(FamilyProcessor):
    """diffusers' ``SanaLinearAttnProcessor2_0`` (Sana's ``attn1``: ReLU-kernel linear self-attention) with op
    slots. Query ops see the projected queries before the ReLU kernel; the core takes (B, N, H, D) tensors like the
    dispatch families; SoftPAG's identity target is V, as diffusers' ``PAGIdentitySanaLinearAttnProcessor2_0``."""

    heads_axis = 2

    def original_core(self, query, key, value, attention_mask):
        query = F.relu(query).float().permute(0, 2, 3, 1)  # (B, H, D, N), diffusers' layout
        key = F.relu(key).float().permute(0, 2, 1, 3)  # (B, H, N, D)
        value = F.pad(value.float().permute(0, 2, 3, 1), (0, 0, 0, 1), mode="constant", value=1.0)
        out = torch.matmul(torch.matmul(value, key), query)
        out = out[:, :, :-1] / (out[:, :, -1:] + 1e-15)
        return out.permute(0, 3, 1, 2)  # (B, N, H, D)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        dtype = hidden_states.dtype
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        query = self.query_ops(query, slice(None))
        out = self.attend(query, key, value, attention_mask)
        self.output_ops(out, query, key, value, n_image=query.shape[1])
        out = out.flatten(2, 3).to(dtype)
        return attn.to_out[1](attn.to_out[0](out))


class LTXVideoAttnProcessor(_DispatchBackend, FamilyProcessor):
    """diffusers' ``LTXVideoAttnProcessor`` self-attention (``attn1``: RMS-normed q/k, RoPE over the packed video
    tokens) with op slots."""

    heads_axis = 2

    def original_core(self, query, key, value, attention_mask):
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=self._parallel_config)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        batch, length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query, key = ltx_rotary(query, image_rotary_emb), ltx_rotary(key, image_rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        query = self.query_ops(query, slice(None))
        out = self.attend(query, key, value, attention_mask)
        self.output_ops(out, query, key, value, n_image=query.shape[1])
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


class QwenDoubleStreamAttnProcessor(_DispatchBackend, FamilyProcessor):
    """diffusers' ``QwenDoubleStreamAttnProcessor2_0`` (Qwen-Image's joint [text, image] attention, RoPE on both
    streams, the text padding mask) with op slots; returns (image, text) as the original does."""

    heads_axis = 2
    text_first = True

    def original_core(self, query, key, value, attention_mask):
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=self._parallel_config)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None):
        if encoder_hidden_states is None or attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask,
                                 attention_mask, image_rotary_emb)  # the original's own errors
        if encoder_hidden_states_mask is not None:
            image = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image], dim=1)[:, None, None, :]
        n_text, head_dim = encoder_hidden_states.shape[1], attn.inner_dim // attn.heads
        image_qkv = (p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v))
        img_q, img_k, img_v = image_qkv
        txt_q, txt_k, txt_v = text_qkv(attn, encoder_hidden_states, lambda t: t.unflatten(-1, (-1, head_dim)))
        if attn.norm_q is not None:
            img_q = attn.norm_q(img_q)
        if attn.norm_k is not None:
            img_k = attn.norm_k(img_k)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_q, img_k = (apply_rotary_emb_qwen(t, img_freqs, use_real=False) for t in (img_q, img_k))
            txt_q, txt_k = (apply_rotary_emb_qwen(t, txt_freqs, use_real=False) for t in (txt_q, txt_k))
        query, key, value = (torch.cat(pair, dim=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        query = self.query_ops(query, slice(n_text, None))
        out = self.attend(query, key, value, attention_mask)
        self.output_ops(out, query, key, value, n_image=query.shape[1] - n_text)
        out = out.flatten(2, 3).to(query.dtype)
        image_out = attn.to_out[0](out[:, n_text:].contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(out[:, :n_text].contiguous())


class HunyuanVideoAttnProcessor(_DispatchBackend, FamilyProcessor):
    """diffusers' ``HunyuanVideoAttnProcessor2_0`` (joint [video, text] attention of the double-stream blocks, and of
    the single-stream blocks with shared projections; RoPE on the video tokens) with op slots."""

    heads_axis = 2

    def original_core(self, query, key, value, attention_mask):
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=self._parallel_config)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        n_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        shared = attn.add_q_proj is None and encoder_hidden_states is not None  # a single-stream block
        n_image = hidden_states.shape[1]
        if shared:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (p(hidden_states).unflatten(2, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            if shared:
                query = torch.cat([apply_rotary_emb(query[:, :n_image], image_rotary_emb, sequence_dim=1),
                                   query[:, n_image:]], dim=1)
                key = torch.cat([apply_rotary_emb(key[:, :n_image], image_rotary_emb, sequence_dim=1),
                                 key[:, n_image:]], dim=1)
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            q_ctx, k_ctx, v_ctx = text_qkv(attn, encoder_hidden_states, lambda t: t.unflatten(2, (attn.heads, -1)))
            query, key, value = torch.cat([query, q_ctx], 1), torch.cat([key, k_ctx], 1), torch.cat([value, v_ctx], 1)
        query = self.query_ops(query, slice(0, n_image))
        out = self.attend(query, key, value, attention_mask)
        self.output_ops(out, query, key, value, n_image=n_image)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out, None
        out, ctx = out[:, :-n_text], out[:, -n_text:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            ctx = attn.to_add_out(ctx)
        return out, ctx


def _wan_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding on (B, N, H, D)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def check_mirrored(family, attention: dict, names) -> None:
    """Refuse layers whose processor is neither ours nor the diffusers processor ours mirrors (a user's own, an
    IP-Adapter's): its computation could not go on unchanged under ours."""
    mirrored = MIRRORED_PROCESSORS[family.name][1]
    for name in names:
        processor = attention[name].processor
        if not isinstance(processor, FamilyProcessor) and type(processor).__name__ != mirrored:
            raise ValueError(f"{name} uses {type(processor).__name__}, which mmattn cannot change without "
                             f"bypassing it (it mirrors diffusers' {mirrored}); select other layers or set "
                             f"that layer's processor back to {mirrored}")


def family_processor(attn, family, info: CallInfo, changes) -> FamilyProcessor:
    """The layer's FamilyProcessor, installed over the original one if needed (its undo registered in
    ``changes``: the original comes back once no op and no core is left)."""
    if not isinstance(attn.processor, FamilyProcessor):
        original = attn.processor
        attn.set_processor(PROCESSORS[family.name](original, info))
        changes.add(functools.partial(_restore_processor, attn, original))
    return attn.processor


def _restore_processor(attn, original) -> None:
    if not attn.processor.ops and attn.processor.core is None:
        attn.set_processor(original)


PROCESSORS = {
    "unet": AttnProcessor,
    "pixart": AttnProcessor,
    "sd3": JointAttnProcessor,
    "flux": FluxAttnProcessor,
    "wan": WanAttnProcessor,
    "sana": SanaLinearAttnProcessor,
    "cogvideox": CogVideoXAttnProcessor,
    "ltx": LTXVideoAttnProcessor,
    "hunyuandit": HunyuanAttnProcessor,
    "qwenimage": QwenDoubleStreamAttnProcessor,
    "hunyuanvideo": HunyuanVideoAttnProcessor,
}
