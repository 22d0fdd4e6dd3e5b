"""Head-level perturbation processors (SoftPAG / PAG / SoftUG) for diffusion attention families.

SoftPAG's blend needs no kernel: with ``A' = (1-u)·A + u·I`` and ``I·V = V``, the head output is
``(1-u)·attn(Q,K,V) + u·V``, and the uniform target gives ``(1-u)·attn + u·mean_k(V)``. It is
applied to the fused attention output of the perturbed batch rows only; other rows and heads keep
the exact computation of the processor they replace.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmattn.adapters import diffusion_family
from mmattn.api import register_installer
from mmattn.configs import SoftPAG
from mmattn.guidance import GuidedDenoiser, PerturbationState
from mmattn.heads import resolve_heads


def blend_heads(out: torch.Tensor, value: torch.Tensor, rows: slice, heads: torch.Tensor, strength: float, target: str) -> None:
    """In place on ``out`` (B, H, N, D): selected rows and heads become (1-u)·out + u·target(V)."""
    if strength == 0.0:
        return
    v = value[rows][:, heads]
    if target == "uniform":
        v = v.mean(dim=2, keepdim=True)
    o = out[rows][:, heads]
    out[rows, heads] = torch.lerp(o, v.to(o.dtype).expand_as(o), strength)


class SoftPAGJointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3 joint [image, text] attention) plus SoftPAG on chosen heads.

    The identity/uniform target acts over the whole joint sequence of the perturbed rows.
    """

    def __init__(self, heads: tuple[int, ...], strength: float, target: str, state: PerturbationState):
        self.heads = torch.tensor(heads, dtype=torch.long)
        self.strength = strength
        self.target = target
        self.state = state

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
        if self.state.rows is not None:
            blend_heads(out, value, self.state.rows, self.heads.to(out.device), self.strength, self.target)
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3]).to(query.dtype)

        if encoder_hidden_states is not None:
            out, ctx = out[:, :n_image], out[:, n_image:]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, ctx) if encoder_hidden_states is not None else out


PROCESSORS = {"sd3": SoftPAGJointAttnProcessor}


@register_installer(SoftPAG)
def install_softpag(pipe, config: SoftPAG):
    """Swap the selected layers' processors and wrap the denoiser for the guidance term."""
    family = diffusion_family(pipe)
    denoiser = family.denoiser(pipe)
    layers = family.attention_layers(denoiser)
    selection = resolve_heads(config.heads, {name: attn.heads for name, attn in layers.items()})
    if isinstance(denoiser.__dict__.get("forward"), GuidedDenoiser):
        raise ValueError("a perturbation-guidance method is already applied to this pipeline; remove() it first")

    state = PerturbationState()
    originals = {name: layers[name].processor for name in selection}
    for name, heads in selection.items():
        layers[name].set_processor(PROCESSORS[family.name](heads, config.strength, config.target, state))
    wrapper = GuidedDenoiser(pipe, denoiser, family.batched_inputs, state, config.scale, config.start, config.stop)

    def undo() -> None:
        wrapper.restore()
        for name, processor in originals.items():
            layers[name].set_processor(processor)

    return undo
