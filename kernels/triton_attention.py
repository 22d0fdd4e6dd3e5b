"""Triton kernels: flash forward (plain, block-sparse, grouped) and probability statistics from a saved LSE.

One forward kernel serves every mode. A program owns ``BLOCK_M`` query rows of one (batch, head) and walks
a list of key blocks with an online softmax in base 2:

* dense: key blocks ``0 .. ceil(hi / BLOCK_N)`` (``hi`` stops at the diagonal when causal);
* sparse (:class:`BlockMask`): the query block's full blocks, then its partial blocks, whose dense tile is
  loaded only for partial blocks; empty blocks are never visited.

With ``GROUPS > 0`` keys carry a group id and each group keeps its own accumulator and mass under the one
shared running max, so the caller can reweight groups exactly afterwards.

``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (numpy interpreter). Triton reads it when a function is
decorated, its own ``tl`` helpers included, so it must be set before ``triton`` is first imported;
``INTERPRETED`` records what this process got.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .mask import BlockMask

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, M, ACC, L, GID,
    FULL_CNT, FULL_IDX, PART_CNT, PART_IDX, PART_MASK,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_gb, stride_cb, stride_ch, stride_fb, stride_fh, stride_pb, stride_ph, stride_tb, stride_th,
    H, REP, NQ, NK, D, WF, WP, qk_scale,
    CAUSAL: tl.constexpr, SPARSE: tl.constexpr, GROUPS: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // REP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < NQ
    d_ok = offs_d < D

    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)  # (batch, head) base offsets in int64: B*H*N*D may pass 2^31
    q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l0 = tl.zeros([BLOCK_M], tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    l2 = tl.zeros([BLOCK_M], tl.float32)
    l3 = tl.zeros([BLOCK_M], tl.float32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    nf = 0
    n_iter = 0
    if SPARSE:
        cnt = b * stride_cb + h * stride_ch + pid_m
        nf = tl.load(FULL_CNT + cnt)
        n_iter = nf + tl.load(PART_CNT + cnt)
        full_idx = FULL_IDX + b * stride_fb + h * stride_fh + pid_m * WF
        part_idx = PART_IDX + b * stride_pb + h * stride_ph + pid_m * WP
        tiles = PART_MASK + b64 * stride_tb + h64 * stride_th + pid_m.to(tl.int64) * WP * (BLOCK_M * BLOCK_N)
        tile_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + offs_n0[None, :]
    else:
        hi = NK
        if CAUSAL:
            hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
        n_iter = tl.cdiv(hi, BLOCK_N)

    for j in range(0, n_iter):
        kb = j
        if SPARSE:
            is_part = j >= nf
            kb = tl.load(full_idx + j, mask=j < nf, other=0) + tl.load(part_idx + (j - nf), mask=is_part, other=0)
        offs_n = kb * BLOCK_N + offs_n0
        col_ok = offs_n < NK
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=d_ok[:, None] & col_ok[None, :],
                     other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        keep = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        if SPARSE:
            tile = tl.load(tiles + (j - nf) * BLOCK_M * BLOCK_N + tile_offs, 
                           mask=tile_offs < is_part.to(tl.int32) * (BLOCK_M * BLOCK_N), other=1)
            keep = keep & (tile != 0)
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        m_i = m_new
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if GROUPS == 0:
            l0 = l0 * alpha + tl.sum(p, 1)
            acc0 = acc0 * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        else:
            gid = tl.load(GID + b64 * stride_gb + offs_n, mask=col_ok, other=-1)
            p0 = tl.where(gid[None, :] == 0, p, 0.0)
            l0 = l0 * alpha + tl.sum(p0, 1)
            acc0 = acc0 * alpha[:, None] + tl.dot(p0.to(v.dtype), v, input_precision=PREC)
            if GROUPS > 1:
                p1 = tl.where(gid[None, :] == 1, p, 0.0)
                l1 = l1 * alpha + tl.sum(p1, 1)
                acc1 = acc1 * alpha[:, None] + tl.dot(p1.to(v.dtype), v, input_precision=PREC)
            if GROUPS > 2:
                p2 = tl.where(gid[None, :] == 2, p, 0.0)
                l2 = l2 * alpha + tl.sum(p2, 1)
                acc2 = acc2 * alpha[:, None] + tl.dot(p2.to(v.dtype), v, input_precision=PREC)
            if GROUPS > 3:
                p3 = tl.where(gid[None, :] == 3, p, 0.0)
                l3 = l3 * alpha + tl.sum(p3, 1)
                acc3 = acc3 * alpha[:, None] + tl.dot(p3.to(v.dtype), v, input_precision=PREC)

    row = pid_bh.to(tl.int64) * NQ + offs_m
    l_all = l0 + l1 + l2 + l3
    lse = tl.where(l_all > 0, m_i * 0.6931471805599453 + tl.log(tl.where(l_all > 0, l_all, 1.0)), float("-inf"))
    tl.store(LSE + row, lse, mask=row_ok)
    out_offs = row[:, None] * D + offs_d[None, :]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if GROUPS == 0:
        out = acc0 / tl.where(l0 > 0, l0, 1.0)[:, None]
        tl.store(O + out_offs, out.to(O.dtype.element_ty), mask=out_mask)
    else:
        tl.store(M + row, m_i * 0.6931471805599453, mask=row_ok)
        plane = tl.num_programs(1).to(tl.int64) * NQ
        tl.store(ACC + out_offs, acc0, mask=out_mask)
        tl.store(L + row, l0, mask=row_ok)
        if GROUPS > 1:
            tl.store(ACC + plane * D + out_offs, acc1, mask=out_mask)
            tl.store(L + plane + row, l1, mask=row_ok)
        if GROUPS > 2:
            tl.store(ACC + 2 * plane * D + out_offs, acc2, mask=out_mask)
            tl.store(L + 2 * plane + row, l2, mask=row_ok)
        if GROUPS > 3:
            tl.store(ACC + 3 * plane * D + out_offs, acc3, mask=out_mask)
            tl.store(L + 3 * plane + row, l3, mask=row_ok)


@triton.jit
def _row_probs(
    Q, K, LSE, POS, OUT, CODES, TILES,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_cb, stride_ch, stride_tb, stride_th,
    H, REP, R, NK, D, KB, WP, qk_scale,
    CAUSAL: tl.constexpr, SPARSE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """One (row block, key block) tile of P. SPARSE: BLOCK_N is the mask's key block; each row finds its tile
    code at (its query block, this key block); a tile no row visits is written as zeros without a dot."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + offs_n0
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, col_ok, d_ok = offs_m < R, offs_n < NK, offs_d < D
    row = pid_bh.to(tl.int64) * R + offs_m
    p = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    visit = True
    if SPARSE:
        pos = tl.load(POS + offs_m, mask=row_ok, other=0)
        qb = pos // BLOCK_Q
        code = tl.load(CODES + b * stride_cb + h * stride_ch + qb * KB + pid_n, mask=row_ok, other=0)
        visit = tl.max(code, 0) > 0
    if visit:
        q = tl.load(Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        kt = tl.load(K + b * stride_kb + (h // REP).to(tl.int64) * stride_kh + offs_n[None, :] * stride_kn
                     + offs_d[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        lse = tl.load(LSE + row, mask=row_ok, other=float("-inf")) * 1.4426950408889634
        keep = (lse != float("-inf"))[:, None] & col_ok[None, :]
        if CAUSAL:
            pos_c = tl.load(POS + offs_m, mask=row_ok, other=0)
            keep = keep & (pos_c[:, None] >= offs_n[None, :])
        if SPARSE:
            slot = tl.maximum(code - 2, 0)
            tile_row = ((qb * WP + slot).to(tl.int64) * BLOCK_Q + pos % BLOCK_Q) * BLOCK_N
            tile = tl.load(TILES + b * stride_tb + h.to(tl.int64) * stride_th + tile_row[:, None] + offs_n0[None, :],
                           mask=(row_ok & (code >= 2))[:, None], other=1)
            keep = keep & (code > 0)[:, None] & (tile != 0)
        p = tl.where(keep, tl.exp2(s - tl.where(keep, lse[:, None], 0.0)), 0.0)
    tl.store(OUT + row[:, None] * NK + offs_n[None, :], p, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _column_sums(
    Q, K, LSE, QMASK, BLK, NBLK, OUT, CODES, TILES,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_mb, stride_lb, stride_cb, stride_ch,
    stride_tb, stride_th,
    H, REP, NQ, NK, D, KB, WP, qk_scale,
    CAUSAL: tl.constexpr, SPARSE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One key block of one (batch, head): walks, in ascending order, only the query blocks listed in BLK (those
    holding a selected row); SPARSE also skips the ones whose tile with this key block is not visited."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_n = pid_n * BLOCK_N + offs_n0
    offs_d = tl.arange(0, BLOCK_D)
    col_ok, d_ok = offs_n < NK, offs_d < D
    kt = tl.load(K + b * stride_kb + (h // REP).to(tl.int64) * stride_kh + offs_n[None, :] * stride_kn
                 + offs_d[:, None], mask=d_ok[:, None] & col_ok[None, :], other=0.0)
    total = tl.zeros([BLOCK_N], tl.float32)
    start = 0
    if CAUSAL:
        start = pid_n * BLOCK_N // BLOCK_M
    tile_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + offs_n0[None, :]
    n_blk = tl.load(NBLK + b)
    for i in range(0, n_blk):
        mb = tl.load(BLK + b * stride_lb + i)
        go = mb >= start
        code = 1
        if SPARSE:
            code = tl.load(CODES + b * stride_cb + h * stride_ch + mb * KB + pid_n)
            go = go & (code > 0)
        if go:
            offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = offs_m < NQ
            chosen = tl.load(QMASK + b * stride_mb + offs_m, mask=row_ok, other=0) != 0
            lse = tl.load(LSE + pid_bh.to(tl.int64) * NQ + offs_m, mask=row_ok, other=float("-inf"))
            lse = lse * 1.4426950408889634
            q = tl.load(Q + b * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            keep = (chosen & (lse != float("-inf")))[:, None] & col_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            if SPARSE:
                tile_base = (mb * WP + tl.maximum(code - 2, 0)).to(tl.int64) * (BLOCK_M * BLOCK_N)
                tile = tl.load(TILES + b * stride_tb + h.to(tl.int64) * stride_th + tile_base + tile_offs,
                               mask=tile_offs < (code >= 2).to(tl.int32) * (BLOCK_M * BLOCK_N), other=1)
                keep = keep & (tile != 0)
            p = tl.where(keep, tl.exp2(s - tl.where(keep, lse[:, None], 0.0)), 0.0)
            total += tl.sum(p, 0)
    tl.store(OUT + pid_bh.to(tl.int64) * NK + offs_n, total, mask=col_ok)


INTERPRETED = isinstance(_attn_fwd, InterpretedFunction)


def _prec(q):
    """fp32 inputs: exact IEEE dots (no TF32), so fp32 results match the reference tightly."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _tiles(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for head dim d; large tiles when interpreting (fewer programs)."""
    if INTERPRETED:
        return 64, 64, 4, 1
    if d <= 64:
        return 128, 64, 4, 3
    if d <= 128:
        return 128, 64, 8, 2
    return 64, 32, 8, 1


MAX_HEAD_DIM = 256  # one BLOCK_D tile holds the whole head; larger tiles exceed shared memory


def _check(q, k, v):
    if not q.is_cuda and not INTERPRETED:
        raise ValueError("the triton backend needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim={q.shape[-1]} is out of range for the triton backend: expected 1 <= head_dim <= "
                         f"{MAX_HEAD_DIM} (the cpu and reference backends take any head_dim)")
    return [t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)]


def _bh(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A (Bm, Hm, ...) layout tensor with its batch and head strides (0 where broadcast); a dummy if empty."""
    if t.numel() == 0:
        t = torch.zeros(1, 1, *t.shape[2:3], *(max(1, n) for n in t.shape[3:]), dtype=t.dtype, device=t.device)
    t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0), (t.stride(1) if t.shape[1] > 1 else 0)


def _sparse_args(block_mask: BlockMask, device):
    bm = block_mask.to(device)
    fcnt, cb, ch = _bh(bm.full_counts)
    pcnt, _, _ = _bh(bm.partial_counts)
    fidx, fb, fh = _bh(bm.full_indices)
    pidx, pb, ph = _bh(bm.partial_indices)
    tiles, tb, th = _bh(bm.partial_mask.view(torch.uint8))
    ptrs = (fcnt, fidx, pcnt, pidx, tiles)
    return ptrs, (cb, ch, fb, fh, pb, ph, tb, th), (fidx.shape[-1], pidx.shape[-1]), bm


def _launch_forward(q, k, v, scale, causal, block_mask, key_groups, groups):
    """Plain (groups = 0): (out, lse). Grouped: (acc, mass, max, lse)."""
    q, k, v = _check(q, k, v)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    dev = q.device
    f32 = dict(device=dev, dtype=torch.float32)
    lse = torch.empty(b, h, nq, **f32)
    if groups:
        acc, mass, m = torch.empty(groups, b, h, nq, d, **f32), torch.empty(groups, b, h, nq, **f32), torch.empty(
            b, h, nq, **f32)
        gid = key_groups.to(device=dev, dtype=torch.int32).contiguous()
        out_args, stride_gb = (lse, lse, m, acc, mass, gid), gid.stride(0)
    else:
        out = torch.empty(b, h, nq, d, device=dev, dtype=q.dtype)
        out_args, stride_gb = (out, lse, lse, lse, lse, lse), 0
    block_m, block_n, warps, stages = _tiles(d)
    if groups > 1 and not INTERPRETED:
        # one fp32 accumulator per group: smaller row tiles keep them in registers (sm_90 ptxas: 4 groups at
        # BLOCK_M=128 spill 1.6-2 KB per thread, at 64 a quarter of that)
        block_m, warps = (64 if d <= 128 else 32), 8
    if block_mask is None:
        ptrs, strides, sizes = (lse,) * 5, (0,) * 8, (1, 1)
    else:
        ptrs, strides, sizes, bm = _sparse_args(block_mask, dev)
        block_m, block_n = bm.block_q, bm.block_kv
    grid = (triton.cdiv(nq, block_m), b * h)
    _attn_fwd[grid](
        q, k, v, *out_args, *ptrs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), stride_gb, *strides,
        h, h // k.shape[1], nq, nk, d, *sizes, scale * LOG2E,
        CAUSAL=causal, SPARSE=block_mask is not None, GROUPS=groups, PREC=_prec(q),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(d)),
        num_warps=warps, num_stages=stages,
    )
    return (acc, mass, m, lse) if groups else (out, lse)


def attention(q, k, v, *, scale, causal=False, block_mask=None, return_lse=False):
    out, lse = _launch_forward(q, k, v, scale, causal, block_mask, None, 0)
    return (out, lse) if return_lse else out


def grouped_attention(q, k, v, key_groups, *, num_groups, scale, causal=False, block_mask=None):
    return _launch_forward(q, k, v, scale, causal, block_mask, key_groups, num_groups)


def _stat_tiles(d):
    return (64, 64, 4) if INTERPRETED or d <= 128 else (32, 64, 4)


def _code_args(block_mask: BlockMask, device):
    """Tile codes (see :meth:`BlockMask.tile_codes`), partial tiles, their (batch, head) strides, KB and WP."""
    bm = block_mask.to(device)
    codes, cb, ch = _bh(bm.tile_codes())
    tiles, tb, th = _bh(bm.partial_mask.view(torch.uint8))
    return (codes, tiles), (cb, ch, tb, th), (codes.shape[-1], tiles.shape[3])


def row_probs(q_rows, k, lse_rows, *, scale, causal=False, q_positions=None, block_mask=None):
    q_rows, k, _ = _check(q_rows, k, k)
    b, h, r, d = q_rows.shape
    nk = k.shape[2]
    out = torch.empty(b, h, r, nk, device=q_rows.device, dtype=torch.float32)
    lse = lse_rows.float().contiguous()
    sparse = block_mask is not None
    pos = q_positions.to(device=q_rows.device, dtype=torch.int32).contiguous() if causal or sparse else lse
    block_m, block_n, warps = _stat_tiles(d)
    if sparse:
        ptrs, strides, sizes = _code_args(block_mask, q_rows.device)
        block_n, block_q = block_mask.block_kv, block_mask.block_q
    else:
        ptrs, strides, sizes, block_q = (lse, lse), (0,) * 4, (1, 1), 16
    grid = (triton.cdiv(r, block_m), triton.cdiv(nk, block_n), b * h)
    _row_probs[grid](
        q_rows, k, lse, pos, out, *ptrs,
        q_rows.stride(0), q_rows.stride(1), q_rows.stride(2), k.stride(0), k.stride(1), k.stride(2), *strides,
        h, h // k.shape[1], r, nk, d, *sizes, scale * LOG2E,
        CAUSAL=causal, SPARSE=sparse, PREC=_prec(q_rows), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_Q=block_q, num_warps=warps,
    )
    return out


def column_sums(q, k, lse, query_mask, *, scale, causal=False, block_mask=None):
    q, k, _ = _check(q, k, k)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = torch.empty(b, h, nk, device=q.device, dtype=torch.float32)
    block_m, block_n, warps = _stat_tiles(d)
    sparse = block_mask is not None
    if sparse:
        ptrs, strides, sizes = _code_args(block_mask, q.device)
        block_m, block_n = block_mask.block_q, block_mask.block_kv
        if block_m * block_n >= 128 * 128 and not INTERPRETED:
            warps = 8  # K tile held across the loop plus a 128x128 score tile: 4 warps spill at D >= 128 (sm_90)
    else:
        ptrs, strides, sizes = (out, out), (0,) * 4, (1, 1)
    # Query blocks holding a selected row, ascending per batch (no host sync): the kernel walks only those.
    qb = triton.cdiv(nq, block_m)
    qmask = query_mask.to(device=q.device, dtype=torch.uint8).contiguous()
    chosen = torch.nn.functional.pad(qmask, (0, qb * block_m - nq)).view(b, qb, block_m).amax(-1).bool()
    n_blk = chosen.sum(-1, dtype=torch.int32).contiguous()
    blk = torch.sort((~chosen).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32).contiguous()
    grid = (triton.cdiv(nk, block_n), b * h)
    _column_sums[grid](
        q, k, lse.float().contiguous(), qmask, blk, n_blk, out, *ptrs,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), qmask.stride(0), blk.stride(0),
        *strides,
        h, h // k.shape[1], nq, nk, d, *sizes, scale * LOG2E,
        CAUSAL=causal, SPARSE=sparse, PREC=_prec(q), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(d)), num_warps=warps,
    )
    return out
