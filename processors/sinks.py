"""Attention-sink redistribution and head steering for VLM text models, as modifier ops of the shared text
attention (:mod:`mmattn.text_attention`): ZeroTuning (arXiv 2505.11739) so far."""

from __future__ import annotations

import torch

from mmattn import text_attention
from mmattn.adapters import vlm_family
from mmattn.api import installing, register_installer
from mmattn.configs import ZeroTuning
from mmattn.heads import resolve_heads


class InitialTokenWeight:
    """Modifier op: on ``heads`` (bool (H,)), the first key some row of the call sees (per sample: its first
    non-padding token) has its weight multiplied by ``gamma``."""

    def __init__(self, gamma: float, heads: torch.Tensor):
        self.gamma, self.heads = gamma, heads

    def key_weights(self, module, query, key, attention_mask):
        if self.gamma == 1.0:
            return None
        batch, num_heads, q_len, _ = query.shape
        kv_len = key.shape[2]
        seen = text_attention.dense_visibility(attention_mask, batch, q_len, kv_len, query.device)
        first = seen.any(dim=2)[:, 0].int().argmax(dim=1)  # (B or 1,)
        groups = (torch.arange(kv_len, device=query.device) == first[:, None]).long().expand(batch, kv_len)
        weight = torch.where(self.heads.to(query.device), self.gamma, 1.0).view(1, num_heads, 1)
        return groups, [1.0, weight]


def text_heads(model, spec: str, method: str) -> dict[int, tuple[int, ...]]:
    """{decoder layer index: head indices} of a ``layers.<i>[:heads]`` selection on ``model``'s text model."""
    layers = vlm_family(model, method).text_layers(model)
    heads = model.config.text_config.num_attention_heads
    selection = resolve_heads(spec, {f"layers.{i}": heads for i in range(len(layers))})
    if not selection:
        raise ValueError(f"heads={spec!r} selects no layer")
    return {int(name.split(".")[1]): chosen for name, chosen in selection.items()}


@register_installer(ZeroTuning)
def install_zerotuning(model, config: ZeroTuning):
    selection = text_heads(model, config.heads, "ZeroTuning")
    layers = vlm_family(model, "ZeroTuning").text_layers(model)
    for i in selection:
        window = getattr(layers[i].self_attn, "sliding_window", None)
        if window is not None:
            raise ValueError(f"ZeroTuning: layers.{i} of {type(model).__name__} is a sliding-window layer "
                             f"(window {window}), where the initial token leaves the window; select full-attention layers")
    text_attention.check(model, "ZeroTuning")
    heads_total = model.config.text_config.num_attention_heads
    with installing() as changes:
        changes.add(text_attention.use(model, "ZeroTuning"))
        for i, chosen in selection.items():
            mask = torch.zeros(heads_total, dtype=torch.bool)
            mask[list(chosen)] = True
            changes.add(text_attention.add_op(layers[i].self_attn, InitialTokenWeight(config.gamma, mask)))
    return changes.undo
