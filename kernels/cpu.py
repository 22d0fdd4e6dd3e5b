"""CPU path: flash-style attention over chunks with torch matmuls, memory O(chunk x N), never N x N.

Queries are processed a chunk at a time against key chunks with an online softmax (running max ``m``,
mass ``l``, unnormalised output ``acc``). With a :class:`BlockMask`, each query block gathers only the key
blocks it visits; full blocks go unmasked, partial blocks use their dense tile. Plain (ungrouped) block-sparse
attention runs on the native kernel (:mod:`.native`: key blocks read in place, tiles applied as predicates) where
it builds, else on torch's fused CPU flash kernel (:func:`_sparse_fused`): query blocks that visit equally many key
blocks stacked into one call on their gathered keys, or, where key blocks come in long runs of consecutive blocks
(windows), one call per run on a strided view of the keys, the runs merged by their LSE. GQA is handled by viewing
queries as (B, Hkv, Hq // Hkv, N, D) so a kv head is shared by broadcasting, never copied per query head.
Plain attention is the one-group case of grouped attention; computed in fp32. Plain dense or causal
attention without a block mask goes to torch's fused flash kernel for CPU, which is also chunked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import native
from .mask import BlockMask

Q_CHUNK = 256
KV_CHUNK = 4096


def _split_heads(q, hkv):
    """(B, Hq, N, D) -> (B, Hkv, Hq // Hkv, N, D)."""
    b, hq, n, d = q.shape
    return q.reshape(b, hkv, hq // hkv, n, d)


def _bias(visible):
    """Additive mask: 0 where visible, -inf elsewhere (adding is far cheaper than masked_fill on CPU)."""
    return torch.zeros(visible.shape, device=visible.device).masked_fill_(~visible, -math.inf)


class _State:
    """Online-softmax state for one query chunk q5 (B, Hkv, R, n, D): max m, mass l and acc per group."""

    def __init__(self, qc, groups):
        self.q = qc.reshape(*qc.shape[:2], -1, qc.shape[-1])  # (B, Hkv, R*n, D): one matmul for all R heads
        shape = qc.shape[:-1]
        self.m = torch.full(shape, -math.inf, device=qc.device)
        self.l = torch.zeros((groups, *shape), device=qc.device)
        self.acc = torch.zeros((groups, *qc.shape), device=qc.device)

    def update(self, kt, v, bias, gid):
        """Fold in keys kt (B,Hkv,D,L), values v (B,Hkv,L,D), bias (n,L) or None, group ids (B,L) or None.

        With several groups the keys are first sorted by group (per sample), so that each group's share of the
        output is one matmul over its contiguous keys: the work of a single attention call."""
        segments = None
        if gid is not None and self.l.shape[0] > 1:
            order = torch.argsort(gid, dim=1, stable=True)  # (B, L)
            kt = kt.expand(len(order), *kt.shape[1:]).gather(3, order[:, None, None].expand(-1, *kt.shape[1:3], -1))
            v = v.expand(len(order), *v.shape[1:]).gather(2, order[:, None, :, None].expand(-1, v.shape[1], -1,
                                                                                            v.shape[3]))
            if bias is not None:
                bias = bias[:, order].transpose(0, 1)[:, None, None]  # (B, 1, 1, n, L)
            counts = torch.stack([(gid == g).sum(1) for g in range(self.l.shape[0])], dim=1).cumsum(1).tolist()
            segments = [list(zip([0] + row[:-1], row)) for row in counts]
        s4 = self.q @ kt
        s = s4.view(*self.m.shape, -1)
        if bias is not None:
            s += bias
        m_new = torch.maximum(self.m, s.amax(-1))
        m_safe = torch.where(torch.isneginf(m_new), 0.0, m_new)
        alpha = torch.exp(self.m - m_safe)
        p = s.sub_(m_safe[..., None]).exp_()
        self.m = m_new
        self.l.mul_(alpha)
        self.acc.mul_(alpha[..., None])
        if gid is None:
            self.l[0] += p.sum(-1)
            self.acc[0] += (s4 @ v).view(self.acc.shape[1:])
            return
        if segments is None:  # one group
            self.l[0] += p.sum(-1)
            self.acc[0] += (s4 @ v).view(self.acc.shape[1:])
            return
        for b, row in enumerate(segments):
            for g, (start, stop) in enumerate(row):
                if stop > start:
                    self.l[g, b] += p[b, ..., start:stop].sum(-1)
                    self.acc[g, b] += (s4[b, ..., start:stop] @ v[b, :, start:stop]).view(self.acc.shape[2:])


def _forward(q, k, v, scale, causal, block_mask, key_groups, groups):
    """acc (G,B,Hq,Nq,D), mass (G,B,Hq,Nq), max (B,Hq,Nq) in fp32 for 4D inputs."""
    b, hq, nq, d = q.shape
    q5 = _split_heads(q.float() * scale, k.shape[1])
    kt, vf = k.float().transpose(-1, -2), v.float()
    acc = torch.empty(groups, *q5.shape, device=q.device)
    mass = torch.empty(groups, *q5.shape[:-1], device=q.device)
    m = torch.empty(q5.shape[:-1], device=q.device)
    if block_mask is None:
        _dense(q5, kt, vf, causal, key_groups, groups, acc, mass, m)
    else:
        _sparse(q5, kt, vf, causal, block_mask, key_groups, groups, acc, mass, m)
    return acc.reshape(groups, b, hq, nq, d), mass.reshape(groups, b, hq, nq), m.reshape(b, hq, nq)


def _dense(q5, kt, v, causal, key_groups, groups, acc, mass, m):
    """Causal: keys before the query chunk go unmasked; only the chunk's own diagonal square gets a bias."""
    nq, nk = q5.shape[3], v.shape[2]
    for q0 in range(0, nq, Q_CHUNK):
        q1 = min(nq, q0 + Q_CHUNK)
        state = _State(q5[:, :, :, q0:q1], groups)
        end = min(q0, nk) if causal else nk
        spans = [(k0, min(k0 + KV_CHUNK, end), None) for k0 in range(0, end, KV_CHUNK)]
        if causal and q0 < nk:
            diagonal = torch.arange(q0, q1, device=v.device)[:, None] >= torch.arange(q0, min(q1, nk), device=v.device)
            spans.append((q0, min(q1, nk), _bias(diagonal)))
        for k0, k1, bias in spans:
            state.update(kt[..., k0:k1], v[:, :, k0:k1], bias, None if key_groups is None else key_groups[:, k0:k1])
        acc[..., q0:q1, :], mass[..., q0:q1], m[..., q0:q1] = state.acc, state.l, state.m


def _sparse(q5, kt, v, causal, bm: BlockMask, key_groups, groups, acc, mass, m):
    """Block-sparse: one mask (batch, head) slice at a time, each query block against its gathered key blocks."""
    mb, mh = bm.full_counts.shape[:2]
    rep = q5.shape[2]
    for i in range(mb):
        for j in range(mh):
            bs = slice(i, i + 1) if mb > 1 else slice(None)
            kh = slice(j // rep, j // rep + 1) if mh > 1 else slice(None)
            rh = slice(j % rep, j % rep + 1) if mh > 1 else slice(None)
            parts = (bm.full_counts[i, j], bm.full_indices[i, j], bm.partial_counts[i, j],
                     bm.partial_indices[i, j], bm.partial_mask[i, j])
            if key_groups is None:  # plain attention (windows): many query blocks per fused call
                _sparse_fused(q5[bs, kh, rh], kt[bs, kh], v[bs, kh], causal, bm, parts,
                              acc[0, bs, kh, rh], mass[0, bs, kh, rh], m[bs, kh, rh])
                continue
            _sparse_one(q5[bs, kh, rh], kt[bs, kh], v[bs, kh], causal, bm, parts,
                        None if key_groups is None else key_groups[bs], groups,
                        acc[:, bs, kh, rh], mass[:, bs, kh, rh], m[bs, kh, rh])


def _sparse_one(q5, kt, v, causal, bm, parts, key_groups, groups, acc, mass, m):
    full_counts, full_indices, partial_counts, partial_indices = (t.tolist() for t in parts[:4])
    partial_mask = parts[4]
    nq, nk, bq, bk = q5.shape[3], v.shape[2], bm.block_q, bm.block_kv
    device = q5.device
    offs_k = torch.arange(bk, device=device)
    for qb in range(bm.num_q_blocks):
        q0, q1 = qb * bq, min(nq, (qb + 1) * bq)
        state = _State(q5[:, :, :, q0:q1], groups)
        nf, npart = full_counts[qb], partial_counts[qb]
        blocks = full_indices[qb][:nf] + partial_indices[qb][:npart]
        if blocks:
            pos = (torch.tensor(blocks, device=device)[:, None] * bk + offs_k).flatten()
            visible = None
            if npart or causal or pos[-1] >= nk:
                visible = torch.ones(q1 - q0, len(blocks) * bk, dtype=torch.bool, device=device)
                if npart:
                    tiles = partial_mask[qb, :npart, : q1 - q0]
                    visible[:, nf * bk:] = tiles.permute(1, 0, 2).reshape(q1 - q0, npart * bk)
                visible &= pos < nk
                if causal:
                    visible &= torch.arange(q0, q1, device=device)[:, None] >= pos
            pos = pos.clamp_max(nk - 1)
            for c0 in range(0, pos.numel(), KV_CHUNK):
                sel = pos[c0: c0 + KV_CHUNK]
                bias = None if visible is None else _bias(visible[:, c0: c0 + KV_CHUNK])
                gid = None if key_groups is None else key_groups.index_select(1, sel)
                state.update(kt.index_select(3, sel), v.index_select(2, sel), bias, gid)
        acc[..., q0:q1, :], mass[..., q0:q1], m[..., q0:q1] = state.acc, state.l, state.m


SPARSE_ELEMENTS = 1 << 23  # gathered key elements (rows x heads x D) per fused call of _sparse_fused


def _sparse_fused(q5, kt, v, causal, bm: BlockMask, parts, acc, mass, m):
    """Block-sparse plain attention on torch's fused CPU flash kernel.

    Query blocks are grouped by how many full and how many partial key blocks they visit, and whether every visited
    block is full (no mask needed). A group's key rows are gathered once for all heads, its queries are stacked
    along the batch dimension, and one fused call computes the output and the LSE: the visited blocks' FLOPs at
    the fused kernel's speed, with no Python round per query block or per head. Queries, keys, values and results
    are token-major, so that every gather and scatter is one copy of whole rows. ``acc`` receives the normalised
    output, ``mass`` 1 where a row sees a key (else 0) and ``m`` the LSE, so the caller's ``acc / mass`` and
    ``m + log(mass)`` hold.
    """
    full_counts, full_indices, partial_counts = parts[:3]
    b, hkv, rep, nq, d = q5.shape
    nk, bk, device = v.shape[2], bm.block_kv, q5.device
    # Token-major rows, zero-padded to whole blocks: a gather of positions yields (L, B, Hkv, [R,] D), which views
    # as (B * Hkv, L, D) per group; a run of consecutive blocks is such a view without a gather.
    padded = bm.num_q_blocks * bm.block_q  # the last query block's rows past Nq are computed, then dropped
    q_tok = _token_major(q5.permute(3, 0, 1, 2, 4), padded)
    k_tok = _token_major(kt.permute(3, 0, 1, 2), bm.num_kv_blocks * bk)
    v_tok = _token_major(v.permute(2, 0, 1, 3), bm.num_kv_blocks * bk)
    out = _Results(torch.zeros(padded, b, hkv, rep, d, device=device),
                   torch.full((padded, b, hkv, rep), -math.inf, device=device),
                   torch.zeros(padded, dtype=torch.bool, device=device))  # rows that visit nothing: 0, -inf
    buffers = _Buffers(device)
    groups = _run_groups(bm, parts)
    runs = sum(len(runs) * count for _, _, runs, count in groups)
    if runs and bm.num_q_blocks and (full_counts + partial_counts).sum().item() >= RUN_BLOCKS * runs:
        for group in groups:
            _runs_group(q_tok, k_tok, v_tok, nk, causal, bm, parts, group, out, buffers)
        _store(out, nq, acc, mass, m)
        return
    inside = (torch.arange(bm.num_kv_blocks, device=device) + 1) * bk <= nk  # key blocks with no row past Nk
    listed = torch.arange(full_indices.shape[1], device=device) < full_counts[:, None]
    whole = inside[full_indices.long().clamp(0, bm.num_kv_blocks - 1)] | ~listed
    plain = (partial_counts == 0) & whole.all(1) & (not causal)  # no mask needed
    for nf, npart, is_plain in sorted(set(zip(full_counts.tolist(), partial_counts.tolist(), plain.tolist()))):
        if nf + npart == 0:
            continue
        ids = ((full_counts == nf) & (partial_counts == npart) & (plain == is_plain)).nonzero().flatten()
        step = max(1, SPARSE_ELEMENTS // ((nf + npart) * bk * b * hkv * d))
        for s0 in range(0, len(ids), step):
            _fused_group(q_tok, k_tok, v_tok, nk, causal, bm, parts, ids[s0: s0 + step], nf, npart, is_plain,
                         out, buffers)
    _store(out, nq, acc, mass, m)


def _token_major(x, rows):
    """x (N, ...) copied into a zero tensor of ``rows`` >= N rows."""
    out = x.new_zeros(rows, *x.shape[1:])
    out[: x.shape[0]] = x
    return out


def _store(out, nq, acc, mass, m):
    acc.copy_(out.acc[:nq].permute(1, 2, 3, 0, 4))
    m.copy_(out.lse[:nq].permute(1, 2, 3, 0))
    mass.copy_(out.seen[:nq].float().expand(mass.shape))


# The runs path when query blocks visit runs of at least this many consecutive key blocks on average. Measured on
# 2-D windows at 5 % (bench/bench_windows.py, 2 threads): runs of 4.75 blocks (N = 16k) ran 10 % slower than
# gathering them, runs of 8.75 blocks (N = 64k) 10-20 % faster.
RUN_BLOCKS = 6


def _run_groups(bm, parts):
    """Query blocks as groups (first block, step, runs, count): ``count`` consecutive query blocks from ``first``,
    query block ``first + i`` visiting the key blocks ``start + i * step ... start + i * step + length - 1`` for each
    (start, length) in ``runs``, step 0 or 1. Windows in tile order give few groups (a row of interior tiles is one)."""
    full_counts, full_indices, partial_counts, partial_indices = (t.tolist() for t in parts[:4])
    groups = []
    for qb in range(bm.num_q_blocks):
        runs = []
        for block in sorted(full_indices[qb][: full_counts[qb]] + partial_indices[qb][: partial_counts[qb]]):
            if runs and runs[-1][0] + runs[-1][1] == block:
                runs[-1][1] += 1
            else:
                runs.append([block, 1])
        if groups and groups[-1][2]:
            first, step, base, count = groups[-1]
            for st in (0, 1) if step is None else (step,):
                if runs == [[start + count * st, length] for start, length in base]:
                    groups[-1] = (first, st, base, count + 1)
                    break
            else:
                groups.append((qb, None, runs, 1))
        else:
            groups.append((qb, None, runs, 1))
    return [(first, step or 0, base, count) for first, step, base, count in groups if base]


def _runs_group(q_tok, k_tok, v_tok, nk, causal, bm, parts, group, out: _Results, buffers):
    """One group of :func:`_run_groups`: per run, one fused call on a strided view of the keys (no gather), the runs
    merged by their LSE."""
    partial_counts, partial_indices, partial_mask = parts[2:]
    first, step, base, count = group
    _, b, hkv, rep, d = q_tok.shape
    bq, bk, device, bh = bm.block_q, bm.block_kv, q_tok.device, b * hkv
    chunk = max(1, SPARSE_ELEMENTS // (sum(length for _, length in base) * bk * bh * d))
    for c0 in range(0, count, chunk):
        g, q0 = min(chunk, count - c0), first + c0
        ids = torch.arange(q0, q0 + g, device=device)
        rows = slice(q0 * bq, (q0 + g) * bq)
        qg = q_tok[rows].view(g, bq, bh, rep, d).permute(0, 2, 3, 1, 4).reshape(g, bh, rep * bq, d)
        outs, lses = [], []
        for start, length in base:
            start, width = start + c0 * step, length * bk
            kg, vg = (tok.as_strided((g, bh, width, d), (step * bk * bh * d, d, bh * d, 1), start * bk * bh * d)
                      for tok in (k_tok, v_tok))
            blocks = start + torch.arange(length, device=device) + step * torch.arange(g, device=device)[:, None]
            slots = _partial_slots(partial_counts, partial_indices, ids, blocks)  # (g, length), -1: a full block
            pos = (blocks[..., None] * bk + torch.arange(bk, device=device)).view(g, width)
            bias = seen = None
            if causal or (slots >= 0).any() or pos[:, -1].max() >= nk:  # a mask: partial tiles, rows past Nk, causal
                visible = (slots < 0)[..., None, None].expand(g, length, bq, bk)
                if partial_mask.shape[1]:
                    visible = visible | partial_mask[ids[:, None], slots.clamp_min(0)]
                bias = buffers.get("bias", (g, bq, length, bk))
                torch.where(visible.transpose(1, 2), _ZERO, _NEG_INF, out=bias)
                query = ids[:, None] * bq + torch.arange(bq, device=device)
                bias, seen = _finish_bias(bias.view(g, bq, width), pos, query, nk, causal, rep, True)
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, kg, vg, 0.0, False,
                                                                                attn_mask=bias, scale=1.0)[:2]
            if seen is not None:  # the kernel returns 0 as the LSE of a row that sees nothing
                lse = lse.masked_fill(~seen[:, None, None, :].expand(g, bh, rep, bq).reshape(lse.shape), -math.inf)
            outs.append(o)
            lses.append(lse)
        lses = torch.stack(lses)
        total = torch.logsumexp(lses, 0)
        weights = torch.exp(lses - torch.where(torch.isneginf(total), 0.0, total))[..., None]
        merged = outs[0] * weights[0]
        for o, w in zip(outs[1:], weights[1:]):
            merged.addcmul_(o, w)
        out.acc[rows] = merged.view(g, b, hkv, rep, bq, d).permute(0, 4, 1, 2, 3, 5).reshape(g * bq, b, hkv, rep, d)
        out.lse[rows] = total.view(g, b, hkv, rep, bq).permute(0, 4, 1, 2, 3).reshape(g * bq, b, hkv, rep)
        out.seen[rows] = ~torch.isneginf(total[:, 0, :bq]).flatten()


def _partial_slots(partial_counts, partial_indices, ids, blocks):
    """(g, L) index into each query block's partial blocks of ``blocks`` (g, L), -1 where the block is full."""
    listed = partial_indices[ids].long()  # (g, P)
    if not listed.shape[1]:
        return torch.full_like(blocks, -1)
    valid = torch.arange(listed.shape[1], device=listed.device) < partial_counts[ids, None]
    hit = (blocks[..., None] == listed[:, None, :]) & valid[:, None, :]  # (g, L, P)
    return torch.where(hit.any(-1), hit.float().argmax(-1), -1)


@dataclass
class _Results:
    """Token-major results of :func:`_sparse_fused`: output (N, B, Hkv, R, D), LSE (N, B, Hkv, R), seen (N,)."""

    acc: torch.Tensor
    lse: torch.Tensor
    seen: torch.Tensor


class _Buffers:
    """Scratch tensors reused across fused calls: fresh allocations of this size are page-faulted in on every
    call, which on CPU costs more than the gather itself."""

    def __init__(self, device):
        self.device, self.store = device, {}

    def get(self, name, shape, dtype=torch.float32):
        numel = math.prod(shape)
        buf = self.store.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self.store[name] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf[:numel].view(shape)


def _fused_group(q_tok, k_tok, v_tok, nk, causal, bm, parts, ids, nf, npart, is_plain, out: _Results, buffers):
    """Query blocks ``ids``, each visiting ``nf`` full then ``npart`` partial key blocks, in one fused call on their
    gathered keys."""
    _, full_indices, _, partial_indices, partial_mask = parts
    _, b, hkv, rep, d = q_tok.shape
    bq, bk, device = bm.block_q, bm.block_kv, q_tok.device
    g, nb = len(ids), nf + npart
    blocks = torch.cat([full_indices[ids, :nf], partial_indices[ids, :npart]], 1).long()  # (g, nb)
    pos = (blocks[..., None] * bk + torch.arange(bk, device=device)).view(g, nb * bk)  # (g, L) key positions
    rows = (ids[:, None] * bq + torch.arange(bq, device=device)).flatten()  # (g * bq,) query positions
    bias, seen = None, None
    if not is_plain:  # the additive mask: 0 on full blocks, the partial tiles' visibility, rows past Nk, causal
        bias = buffers.get("bias", (g, bq, nb, bk))
        bias[:, :, :nf].zero_()
        if npart:
            torch.where(partial_mask[ids, :npart].transpose(1, 2), _ZERO, _NEG_INF, out=bias[:, :, nf:])
        # rows may see nothing only with causal or without a full block
        bias, seen = _finish_bias(bias.view(g, bq, nb * bk), pos, rows.view(g, bq), nk, causal, rep, causal or nf == 0)
        seen = None if seen is None else seen.flatten()
    qg = torch.index_select(q_tok, 0, rows, out=buffers.get("q", (g * bq, b, hkv, rep, d)))
    qg = qg.view(g, bq, b * hkv, rep, d).permute(0, 2, 3, 1, 4).reshape(g, b * hkv, rep * bq, d)
    index = pos.flatten()
    kg, vg = (torch.index_select(tok, 0, index, out=buffers.get(name, (len(index), *tok.shape[1:])))
              .view(g, nb * bk, b * hkv, d).transpose(1, 2) for name, tok in (("k", k_tok), ("v", v_tok)))
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qg, kg, vg, 0.0, False, attn_mask=bias,
                                                                        scale=1.0)
    out.acc.index_copy_(0, rows, o.view(g, b, hkv, rep, bq, d).permute(0, 4, 1, 2, 3, 5).reshape(-1, b, hkv, rep, d))
    out.lse.index_copy_(0, rows, lse.view(g, b, hkv, rep, bq).permute(0, 4, 1, 2, 3).reshape(-1, b, hkv, rep))
    if seen is None:
        out.seen[rows] = True
        return
    out.seen[rows] = seen
    blind = rows[~seen]  # a row that sees no key: output 0 and LSE -inf (the kernel would return 0 for its LSE)
    out.acc[blind], out.lse[blind] = 0.0, -math.inf


_ZERO, _NEG_INF = torch.tensor(0.0), torch.tensor(-math.inf)


def _finish_bias(bias, pos, query, nk, causal, rep, want_seen):
    """The additive mask (g, bq, L) of one fused call, its tiles' visibility written: also hides keys past Nk
    (``pos`` (g, L) key positions) and, with ``causal``, keys after the query (``query`` (g, bq) positions).
    Returns the mask as the call takes it, (g, 1, rep * bq, L), and where ``want_seen`` the rows that see a key
    (g, bq), else None."""
    past = pos >= nk
    if past.any():
        bias.masked_fill_(past[:, None, :], -math.inf)
    if causal:
        bias.masked_fill_(query[..., None] < pos[:, None, :], -math.inf)
    seen = ~torch.isneginf(bias).all(-1) if want_seen else None
    g, bq, width = bias.shape
    return (bias[:, None] if rep == 1 else bias[:, None].expand(g, rep, bq, width).reshape(g, 1, rep * bq, width)), seen


def _lse(mass, m):
    return torch.where(mass > 0, m + mass.log(), -math.inf)


def attention(q, k, v, *, scale, causal=False, block_mask=None, return_lse=False):
    if block_mask is None and k.shape[2] > 0:
        # Dense or causal: torch's fused flash kernel for CPU is memory-bounded too and returns the LSE.
        rep = q.shape[1] // k.shape[1]
        k, v = (t.repeat_interleave(rep, dim=1) if rep > 1 else t for t in (k, v))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return (out, lse) if return_lse else out
    if block_mask is not None and native.supports(q, block_mask):
        out, lse = native.block_sparse_attention(q, k, v, scale, causal, block_mask)
        out = out.to(q.dtype)
        return (out, lse) if return_lse else out
    acc, mass, m = _forward(q, k, v, scale, causal, block_mask, None, 1)
    l = mass[0]
    out = (acc[0] / torch.where(l > 0, l, 1.0)[..., None]).to(q.dtype)
    return (out, _lse(l, m)) if return_lse else out


def grouped_attention(q, k, v, key_groups, *, num_groups, scale, causal=False, block_mask=None):
    acc, mass, m = _forward(q, k, v, scale, causal, block_mask, key_groups, num_groups)
    return acc, mass, m, _lse(mass.sum(0), m)


def row_probs(q_rows, k, lse_rows, *, scale, causal=False, q_positions=None, block_mask=None):
    hkv = k.shape[1]
    s = (_split_heads(q_rows.float() * scale, hkv) @ k.float()[:, :, None].transpose(-1, -2)).flatten(1, 2)
    if causal:
        s.masked_fill_(q_positions[:, None] < torch.arange(k.shape[2], device=k.device), -math.inf)
    if block_mask is not None:  # (Bm, Hm, R, Nk): only the chosen rows' visibility, never Nq x Nk
        s.masked_fill_(~block_mask.to(k.device).rows_visible(q_positions), -math.inf)
    lse = lse_rows.float()[..., None]
    return torch.where(torch.isneginf(lse), 0.0, s.sub_(lse).exp_())


def column_sums(q, k, lse, query_mask, *, scale, causal=False, block_mask=None):
    """Sum over the selected query rows only, in a fixed order (deterministic)."""
    b, hq, nq, _ = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    out = torch.zeros(b, hkv, hq // hkv, nk, device=q.device)
    if block_mask is not None:
        _column_sums_sparse(q, k, lse, query_mask, scale, causal, block_mask.to(q.device), out)
        return out.reshape(b, hq, nk)
    kt = k.float().transpose(-1, -2)[:, :, None]
    for i in range(b):
        rows = query_mask[i].nonzero().flatten()
        for r0 in range(0, rows.numel(), Q_CHUNK):
            idx = rows[r0: r0 + Q_CHUNK]
            qc = _split_heads(q[i: i + 1, :, idx].float() * scale, hkv)
            s = qc @ kt[i: i + 1]
            if causal:
                s.masked_fill_(idx[:, None] < torch.arange(nk, device=q.device), -math.inf)
            lse_c = _split_heads(lse[i: i + 1, :, idx, None].float(), hkv)
            p = torch.where(torch.isneginf(lse_c), 0.0, s.sub_(lse_c).exp_())
            out[i] += p.sum(-2)[0]
    return out.reshape(b, hq, nk)


def _column_sums_sparse(q, k, lse, query_mask, scale, causal, bm: BlockMask, out):
    """Per batch, mask head slice and query block: the selected rows against the block's listed key blocks only.

    Query blocks without a selected row are skipped; each block's key positions are distinct, so adding into
    ``out`` at them is exact and the order is fixed.
    """
    b, hkv, rep, nk = out.shape
    bq, bk = bm.block_q, bm.block_kv
    mb, mh = bm.full_counts.shape[:2]
    q5 = _split_heads(q.float() * scale, hkv)
    lse5 = _split_heads(lse.float()[..., None], hkv)
    kf = k.float()
    offs_k = torch.arange(bk, device=q.device)
    for i in range(b):
        bi = i if mb > 1 else 0
        selected = query_mask[i].nonzero().flatten()
        q_blocks = (selected // bq).tolist()
        starts = torch.searchsorted(selected, torch.arange(0, bm.num_q_blocks + 1, device=q.device) * bq).tolist()
        for j in range(mh):
            kh = slice(j // rep, j // rep + 1) if mh > 1 else slice(None)
            rh = slice(j % rep, j % rep + 1) if mh > 1 else slice(None)
            fc, fi, pc, pi = (t[bi, j].tolist() for t in (bm.full_counts, bm.full_indices, bm.partial_counts,
                                                           bm.partial_indices))
            for qb in sorted(set(q_blocks)):
                rows = selected[starts[qb]: starts[qb + 1]]
                nf, npart = fc[qb], pc[qb]
                blocks = fi[qb][:nf] + pi[qb][:npart]
                if not blocks:
                    continue
                pos = (torch.tensor(blocks, device=q.device)[:, None] * bk + offs_k).flatten()
                visible = torch.ones(len(rows), len(pos), dtype=torch.bool, device=q.device)
                if npart:
                    tiles = bm.partial_mask[bi, j, qb, :npart][:, rows - qb * bq]
                    visible[:, nf * bk:] = tiles.permute(1, 0, 2).reshape(len(rows), npart * bk)
                if causal:
                    visible &= rows[:, None] >= pos
                inside = pos < nk
                pos, visible = pos[inside], visible[:, inside]
                s = q5[i: i + 1, kh, rh][..., rows, :] @ kf[i: i + 1, kh, None][..., pos, :].transpose(-1, -2)
                s += _bias(visible)
                lse_c = lse5[i: i + 1, kh, rh][..., rows, :]
                p = torch.where(torch.isneginf(lse_c), 0.0, s.sub_(lse_c).exp_())
                o = out[i: i + 1, kh, rh]
                o[..., pos] += p.sum(-2)
