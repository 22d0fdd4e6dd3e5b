"""Plain-torch oracles: materialise the full score matrix in fp32. For tests and small inputs only."""

from __future__ import annotations

import math

import torch

from .mask import BlockMask


def _expand_kv(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """GQA: repeat each kv head so that query head h reads kv head h // (Hq // Hkv)."""
    return t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)


def _visible(q_len, kv_len, causal, block_mask, device):
    """(…, Nq, Nk) bool visibility or None when everything is visible."""
    visible = None
    if block_mask is not None:
        visible = block_mask.to(device).to_dense()
    if causal:
        tri = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril()
        visible = tri if visible is None else visible & tri
    return visible


def _scores(q, k, scale, causal=False, block_mask=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), _expand_kv(q, k).float()) * scale
    visible = _visible(q.shape[2], k.shape[2], causal, block_mask, q.device)
    return s if visible is None else s.masked_fill(~visible, -math.inf)


def _lse(s):
    return torch.logsumexp(s, dim=-1)


def _probs(s, lse):
    """exp(s - lse) with rows of no visible key (lse = -inf) giving zeros."""
    return torch.where(torch.isneginf(lse)[..., None], 0.0, torch.exp(s - lse[..., None]))


def attention(q, k, v, *, scale=None, causal=False, block_mask: BlockMask | None = None, return_lse=False):
    s = _scores(q, k, scale, causal, block_mask)
    lse = _lse(s)
    out = (_probs(s, lse) @ _expand_kv(q, v).float()).to(q.dtype)
    return (out, lse) if return_lse else out


def grouped_attention(q, k, v, key_groups, *, num_groups, scale=None, causal=False, block_mask=None):
    """(acc (G,B,H,Nq,D), mass (G,B,H,Nq), max (B,H,Nq), lse (B,H,Nq)), all fp32."""
    s = _scores(q, k, scale, causal, block_mask)
    m = s.amax(dim=-1)
    p = torch.where(torch.isneginf(m)[..., None], 0.0, torch.exp(s - m[..., None]))
    v = _expand_kv(q, v).float()
    acc, mass = [], []
    for g in range(num_groups):
        pg = p * (key_groups == g)[:, None, None, :]
        acc.append(pg @ v)
        mass.append(pg.sum(-1))
    mass = torch.stack(mass)
    return torch.stack(acc), mass, m, m + mass.sum(0).log()


def row_probs(q_rows, k, lse_rows, *, scale=None, causal=False, q_positions=None, block_mask=None):
    s = _scores(q_rows, k, scale)
    if causal:
        s = s.masked_fill(q_positions[:, None] < torch.arange(k.shape[2], device=k.device), -math.inf)
    if block_mask is not None:
        s = s.masked_fill(~block_mask.to(k.device).to_dense()[:, :, q_positions.long()], -math.inf)
    return _probs(s, lse_rows.float())


def column_sums(q, k, lse, query_mask, *, scale=None, causal=False, block_mask=None):
    p = _probs(_scores(q, k, scale, causal, block_mask), lse.float())
    return (p * query_mask[:, None, :, None]).sum(dim=2)
