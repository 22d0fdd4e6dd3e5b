"""Public ops and backend choice: Triton on CUDA, the chunked CPU path on CPU, the reference on request.

``backend="triton" | "cpu" | "reference"`` (or env ``MMATTN_KERNEL_BACKEND``) forces one; the argument wins
over the env var. Triton on CPU tensors needs ``TRITON_INTERPRET=1`` set before ``triton`` is imported (slow,
for tests).

Conventions: q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D) with Hkv dividing Hq (query head h reads kv head
h // (Hq // Hkv)); ``scale`` defaults to D ** -0.5; ``causal`` is top-left (query i sees keys j <= i, as
SDPA's ``is_causal``); LSE is fp32 in natural log, -inf for rows that see no key (their output is 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import import_module
from typing import Sequence

import torch

from .mask import BlockMask

BACKENDS = ("triton", "cpu", "reference")
MAX_GROUPS = 4
_MODULES = {"triton": "triton_attention", "cpu": "cpu", "reference": "reference"}


def _impl(backend: str | None, x: torch.Tensor):
    name = backend or os.environ.get("MMATTN_KERNEL_BACKEND") or ("triton" if x.is_cuda else "cpu")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {name!r}")
    return import_module(f".{_MODULES[name]}", __package__)


def _check_mask(block_mask, q, k, q_len=None):
    """A mask for (B, Hq, q_len, Nk) inputs, q_len defaulting to q's own length."""
    if block_mask is not None:
        bm, hm = block_mask.full_counts.shape[:2]
        q_len = q.shape[2] if q_len is None else q_len
        if (block_mask.q_len, block_mask.kv_len) != (q_len, k.shape[2]) or bm not in (1, q.shape[0]) or \
                hm not in (1, q.shape[1]):
            raise ValueError(f"block mask is for ({bm}, {hm}, {block_mask.q_len}, {block_mask.kv_len}), inputs are "
                             f"{(q.shape[0], q.shape[1], q_len, k.shape[2])}")


def _check(q, k, v, block_mask=None):
    _check_mask(block_mask, q, k)
    if q.dim() != 4 or q.shape[1] % k.shape[1] or k.shape != v.shape or q.shape[::3] != k.shape[::3]:
        raise ValueError(f"need q (B,Hq,N,D), k = v (B,Hkv,Nk,D) with Hkv dividing Hq; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    return q


def _scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def attention(q, k, v, *, scale=None, causal=False, block_mask: BlockMask | None = None, return_lse=False,
              backend: str | None = None):
    """Softmax attention; returns out (B, Hq, Nq, D) in q's dtype, and LSE (B, Hq, Nq) if ``return_lse``."""
    impl = _impl(backend, _check(q, k, v, block_mask))
    return impl.attention(q, k, v, scale=_scale(q, scale), causal=causal, block_mask=block_mask,
                          return_lse=return_lse)


@dataclass
class GroupedAttention:
    """Per-group sums under one shared running max ``max`` (B, H, Nq), all fp32.

    ``acc`` (G, B, H, Nq, D) = sum_j exp(s_j - max) v_j over keys of group g, ``mass`` (G, B, H, Nq) the same
    sum of exp(s_j - max), ``lse`` = max + log(sum_g mass_g) (-inf for rows that see no key).
    """

    acc: torch.Tensor
    mass: torch.Tensor
    max: torch.Tensor
    lse: torch.Tensor

    def combine(self, weights, dtype=None) -> torch.Tensor:
        return combine_groups(self, weights, dtype)


def combine_groups(result: GroupedAttention, weights: Sequence | torch.Tensor, dtype=None) -> torch.Tensor:
    """o = sum_g w_g acc_g / sum_g w_g mass_g, exact per (batch, head, row); rows of zero mass give 0.

    ``weights``: G entries (a sequence, or a tensor with leading dim G), each a scalar or a tensor
    broadcastable to (B, H, Nq).
    """
    groups = result.acc.shape[0]
    if len(weights) != groups:
        raise ValueError(f"expected {groups} group weights; got {len(weights)}")
    num = torch.zeros_like(result.acc[0])
    den = torch.zeros_like(result.mass[0])
    for g, w in enumerate(weights):
        w = torch.as_tensor(w, dtype=torch.float32, device=num.device)
        num += w[..., None] * result.acc[g]
        den += w * result.mass[g]
    out = torch.where(den[..., None] != 0, num / torch.where(den != 0, den, 1.0)[..., None], 0.0)
    return out if dtype is None else out.to(dtype)


def grouped_attention(q, k, v, key_groups, *, weights=None, scale=None, causal=False,
                      block_mask: BlockMask | None = None, num_groups: int | None = None,
                      backend: str | None = None):
    """Attention with keys split into up to 4 groups by ``key_groups`` (B, Nk) int ids in [0, num_groups).

    Without ``weights``: a :class:`GroupedAttention`. With ``weights`` (see :func:`combine_groups`): the
    reweighted output (B, Hq, Nq, D) in q's dtype; all weights 1 gives plain attention.
    ``num_groups`` defaults to ``key_groups.max() + 1`` (a device sync).
    """
    if key_groups.shape != (q.shape[0], k.shape[2]):
        raise ValueError(f"key_groups must be (B, Nk) = {(q.shape[0], k.shape[2])}; got {tuple(key_groups.shape)}")
    num_groups = int(key_groups.max().item()) + 1 if num_groups is None else num_groups
    if not 1 <= num_groups <= MAX_GROUPS:
        raise ValueError(f"1 to {MAX_GROUPS} key groups supported; got {num_groups}")
    result = GroupedAttention(*_impl(backend, _check(q, k, v, block_mask)).grouped_attention(
        q, k, v, key_groups.to(q.device), num_groups=num_groups, scale=_scale(q, scale), causal=causal,
        block_mask=block_mask))
    return result if weights is None else combine_groups(result, weights, q.dtype)


def row_probs(q_rows, k, lse_rows, *, scale=None, causal=False, q_positions=None,
              block_mask: BlockMask | None = None, backend: str | None = None):
    """Probabilities (B, Hq, R, Nk) fp32 of chosen query rows over all keys, from their saved LSE (B, Hq, R).

    ``q_positions`` (R,) gives each row's query index; it is needed with ``causal``, and with ``block_mask``
    unless the rows are all ``block_mask.q_len`` queries in order. ``block_mask`` (the mask the attention ran
    with) zeroes the pairs it hides, so rows match the saved LSE and sum to 1 (0 for rows that saw no key).
    Without it only ``causal`` masks; keys the original attention hid must then be zeroed by the caller.
    """
    if causal and q_positions is None:
        raise ValueError("causal row_probs needs q_positions")
    impl = _impl(backend, _check(q_rows, k, k))
    if block_mask is not None:
        if q_positions is None:
            if q_rows.shape[2] != block_mask.q_len:
                raise ValueError(f"row_probs with a block mask needs q_positions unless all {block_mask.q_len} "
                                 f"rows are given; got {q_rows.shape[2]}")
            q_positions = torch.arange(q_rows.shape[2], device=q_rows.device)
        _check_mask(block_mask, q_rows, k, block_mask.q_len)
    if q_positions is not None and q_positions.shape != (q_rows.shape[2],):
        raise ValueError(f"q_positions must be ({q_rows.shape[2]},); got {tuple(q_positions.shape)}")
    return impl.row_probs(q_rows, k, lse_rows, scale=_scale(q_rows, scale), causal=causal, q_positions=q_positions,
                          block_mask=block_mask)


def column_sums(q, k, lse, query_mask, *, scale=None, causal=False, block_mask: BlockMask | None = None,
                backend: str | None = None):
    """Per-key sums (B, Hq, Nk) fp32 of probabilities over the queries selected by ``query_mask`` (B, Nq) bool.

    Recomputes scores tile by tile against the saved LSE (B, Hq, Nq); deterministic (no atomics).
    ``block_mask``: the mask the attention ran with; hidden pairs count 0 and unvisited tiles are skipped.
    """
    impl = _impl(backend, _check(q, k, k))
    _check_mask(block_mask, q, k)
    return impl.column_sums(q, k, lse, query_mask.bool(), scale=_scale(q, scale), causal=causal,
                            block_mask=block_mask)
