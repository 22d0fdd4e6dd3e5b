"""One transformers attention implementation for VLM text models, with ops per attention module.

``"mmattn"`` is registered with transformers' ``AttentionInterface`` (and its mask function with
``AttentionMaskInterface``). A text model switched to it runs, in each attention module, the ops added there:

* **observers** (``op.observe(module, query, key, value, attention_mask, kwargs)``) see the attention the
  layer computes: queries after RoPE, keys and values as cached, the layer's own mask (pruning's scorers);
* **modifiers** (``op.key_weights(module, query, key, attention_mask) -> (key_groups (B, Nk), weights)`` or
  None to leave the call as it is) reweight groups of keys: the keys of group g get weight w_g (a scalar or a tensor broadcastable to
  (B, Hq, Nq)), exactly, per (head, row), through ``kernels.grouped_attention`` (one running max, no N x N
  matrix): o = sum_g w_g acc_g / sum_g w_g mass_g. Several modifiers multiply their weights.

Without a modifier the call is transformers' SDPA attention exactly, so observers change nothing. Methods add
ops with :func:`add_op` after :func:`use` (which switches the text model to ``"mmattn"`` on first use and back
when the last user goes), so pruning, sinks and steering share one model.
"""

from __future__ import annotations

import weakref

import torch

from . import kernels
from ._compat import AttentionInterface, AttentionMaskInterface, sdpa_attention_forward, sdpa_mask
from .kernels import BlockMask

IMPLEMENTATION = "mmattn"
_OPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> [op]
_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [original implementation, op count]


def visible(mask: torch.Tensor) -> torch.Tensor:
    """A transformers attention mask as bool, True = visible (bool masks as they are; additive float masks:
    entries above half the dtype's minimum)."""
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


# Masks from composable predicates over original token positions: ``predicate(q, k) -> bool`` with q (.., Nq, 1)
# and k (B, 1, Nk) broadcasting, as transformers composes its masks (causal, sliding window, padding).
def causal(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return k <= q


def sliding_window(size: int):
    """Keys within the last ``size`` positions up to the query (transformers' sliding-window layers)."""
    return lambda q, k: k > q - size


def not_padding(padding: torch.Tensor):
    """Keys whose position is a real token of the 2D (B, N) ``padding`` mask (1 = token, 0 = padding)."""
    real = padding.bool()
    return lambda q, k: real.gather(1, k[:, 0].expand(real.shape[0], -1))[:, None, :]


def position_mask(q_positions: torch.Tensor, k_positions: torch.Tensor, *predicates) -> torch.Tensor:
    """(B, 1, Nq, Nk) bool: every predicate holds for (query position, key position); ``q_positions`` (Nq,) or
    (B, Nq), ``k_positions`` (B, Nk)."""
    q, k = q_positions[..., :, None], k_positions[:, None, :]
    if q.dim() == 2:
        q = q[None]
    allowed = predicates[0](q, k)
    for predicate in predicates[1:]:
        allowed = allowed & predicate(q, k)
    return allowed[:, None]


def dense_visibility(attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int,
                     device) -> torch.Tensor:
    """(B or 1, 1, q_len, kv_len) bool visibility of one attention call: its mask, or with none (transformers
    then runs SDPA causally when q_len > 1) causal with the queries at the end of the keys."""
    if attention_mask is not None:
        return visible(attention_mask[:, :, :, :kv_len])
    if q_len == 1:
        return torch.ones(1, 1, 1, kv_len, dtype=torch.bool, device=device)
    rows = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return (torch.arange(kv_len, device=device)[None, :] <= rows)[None, None]


def attention(module, query, key, value, attention_mask, **kwargs):
    """The "mmattn" attention implementation (transformers' calling convention)."""
    ops = _OPS.get(module, ())
    for op in ops:
        if hasattr(op, "observe"):
            op.observe(module, query, key, value, attention_mask, kwargs)
    reweights = [r for r in (op.key_weights(module, query, key, attention_mask) for op in ops
                             if hasattr(op, "key_weights")) if r is not None]
    if not reweights:  # no modifier, or every modifier leaves this call as it is
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _reweighted(query, key, value, attention_mask, reweights, kwargs)


def _reweighted(query, key, value, attention_mask, reweights, kwargs):
    batch, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    seen = dense_visibility(attention_mask, batch, q_len, kv_len, query.device)
    groups, weights = None, None
    for g, w in reweights:  # combined: the product of the groups' weights (group ids as mixed-radix digits)
        w = [torch.as_tensor(x, dtype=torch.float32, device=query.device) for x in w]
        if groups is None:
            groups, weights = g, w
        else:
            groups = groups * len(w) + g
            weights = [a * b for a in weights for b in w]
    block_mask = BlockMask.from_dense(seen.expand(batch, 1, q_len, kv_len))
    out = kernels.grouped_attention(query, key, value, groups, weights=weights, scale=kwargs.get("scaling"),
                                    block_mask=block_mask, num_groups=len(weights))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def check(model, method: str) -> None:
    """Refuse a text model that runs neither transformers' "sdpa" nor "mmattn" (``method`` names the caller)."""
    current = model.config.text_config._attn_implementation
    if current not in ("sdpa", IMPLEMENTATION):
        raise ValueError(f"{method} runs on the text model's 'sdpa' attention; {type(model).__name__} uses {current!r}")


def use(model, method: str):
    """Switch ``model``'s text model to "mmattn" (counted: the last undo switches it back). Returns undo."""
    check(model, method)
    if model not in _MODELS:
        original = model.config.text_config._attn_implementation
        model.set_attn_implementation({"text_config": IMPLEMENTATION})
        _MODELS[model] = [original, 0]
    _MODELS[model][1] += 1

    def undo() -> None:
        _MODELS[model][1] -= 1
        if _MODELS[model][1] == 0:
            model.set_attn_implementation({"text_config": _MODELS.pop(model)[0]})

    return undo


def add_op(module: torch.nn.Module, op):
    """Add ``op`` to attention ``module`` (of a text model switched by :func:`use`). Returns undo."""
    _OPS.setdefault(module, []).append(op)

    def undo() -> None:
        _OPS[module].remove(op)
        if not _OPS[module]:
            del _OPS[module]

    return undo
