"""attention(): the CPU path and the Triton kernel (interpreted on CPU) against the reference."""

import math
import os
import shutil

import pytest
import torch

import mmattn.kernels as K
from mmattn.kernels import BlockMask
from mmattn.kernels import cpu as cpu_path
from mmattn.kernels import native

F32, F16 = torch.float32, torch.float16
# (B, Hq, Hkv, Nq, Nk, D, dtype, causal, sparse); sparse = (block_q, block_kv, per-head mask)
CASES = [
    (1, 2, 2, 1, 1, 16, F32, False, None),
    (2, 4, 2, 17, 17, 40, F16, True, None),
    (1, 2, 1, 100, 100, 64, F32, True, None),
    (1, 2, 2, 257, 257, 40, F16, False, None),
    (2, 2, 1, 100, 257, 16, F32, False, None),
    (1, 2, 2, 100, 100, 40, F32, False, (32, 64, False)),
    (1, 4, 2, 257, 257, 64, F16, True, (64, 32, True)),
    (2, 2, 2, 17, 100, 16, F32, False, (32, 32, True)),
]
# The interpreter is slow: it runs every case above; the CPU path also runs the fuller grid below.
CPU_ONLY = [
    (b, 2 * h, h, n, n, d, dt, c, s)
    for b, h in ((1, 1), (2, 2))
    for n in (1, 17, 100, 257)
    for d in (16, 40, 64)
    for dt, c, s in ((F32, False, None), (F16, True, (32, 64, True)))
    if (n + d + b) % 2 == 0
]


def _mask(helpers, b, hq, nq, nk, sparse):
    if sparse is None:
        return None
    bq, bk, per_head = sparse
    dense = helpers.random_mask(b if per_head else 1, hq if per_head else 1, nq, nk, 0.05, empty_rows=[0, nq // 2])
    return BlockMask.from_dense(dense, bq, bk)


def _check(helpers, backend, case):
    b, hq, hkv, nq, nk, d, dtype, causal, sparse = case
    q, k, v = helpers.make_qkv(b, hq, hkv, nq, nk, d, dtype)
    bm = _mask(helpers, b, hq, nq, nk, sparse)
    out, lse = K.attention(q, k, v, causal=causal, block_mask=bm, return_lse=True, backend=backend)
    ref, ref_lse = K.attention(q, k, v, causal=causal, block_mask=bm, return_lse=True, backend="reference")
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref, **helpers.TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **helpers.LSE_TOL[dtype])
    if bm is not None:  # rows with no visible key: zeros and -inf, never NaN
        assert torch.isneginf(lse[:, :, 0]).all() and (out[:, :, 0] == 0).all()


@pytest.mark.parametrize("case", CASES + CPU_ONLY, ids=str)
def test_cpu_matches_reference(helpers, case):
    _check(helpers, "cpu", case)


@pytest.mark.triton
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(helpers, interpreted, case):
    _check(helpers, "triton", case)


@pytest.mark.triton
def test_triton_really_interprets(interpreted):
    from triton.runtime.interpreter import InterpretedFunction

    assert isinstance(interpreted._attn_fwd, InterpretedFunction)


# Each block-sparse CPU path, forced: the native kernel, or the torch path (the native kernel refused) with
# RUN_BLOCKS choosing runs or gathered key blocks.
SPARSE_PATHS = {"native": None, "runs": 0, "gathered": math.inf}


def _force(monkeypatch, path):
    if path == "native":
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            pytest.skip("no C++ compiler: the native CPU kernel cannot build here")
        assert native.load() is not None, "the native CPU kernel did not build"
        monkeypatch.setattr(cpu_path, "_forward", None)  # the torch path would fail: the kernel must run
        return
    monkeypatch.setattr(native, "supports", lambda q, bm: False)
    monkeypatch.setattr(cpu_path, "RUN_BLOCKS", SPARSE_PATHS[path])


@pytest.mark.parametrize("path", SPARSE_PATHS)
@pytest.mark.parametrize("case", [case for case in CASES + CPU_ONLY if case[-1] is not None], ids=str)
def test_cpu_sparse_paths_match_reference(helpers, monkeypatch, case, path):
    """Every block-sparse CPU path, forced: the native kernel; fused calls on strided runs of consecutive key
    blocks, merged by LSE; fused calls on gathered key blocks."""
    _force(monkeypatch, path)
    _check(helpers, "cpu", case)


@pytest.mark.parametrize("path", SPARSE_PATHS)
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_block_structured_mask_matches_reference(helpers, monkeypatch, causal, path):
    """Windows give masks of whole tiles: query blocks that visit only full blocks (no mask at all in the fused
    call), others with partial tiles, a last block past N, query blocks visiting nothing, GQA and varying
    counts per query block; on every block-sparse path."""
    _force(monkeypatch, path)
    b, hq, hkv, n, d, bq, bk = 2, 4, 2, 200, 24, 32, 16
    q, k, v = helpers.make_qkv(b, hq, hkv, n, n, d, F32)
    gen = torch.Generator().manual_seed(3)
    tiles = torch.rand(-(-n // bq), -(-n // bk), generator=gen) < 0.4
    tiles[2] = False  # a query block that visits nothing
    dense = tiles.repeat_interleave(bq, 0).repeat_interleave(bk, 1)[:n, :n].clone()
    dense[5 * bq: 6 * bq] &= torch.rand(bq, n, generator=gen) < 0.7  # partial tiles in one query block
    bm = BlockMask.from_dense(dense[None, None], bq, bk)
    assert (bm.partial_counts == 0).any() and (bm.partial_counts > 0).any()
    out, lse = K.attention(q, k, v, causal=causal, block_mask=bm, return_lse=True, backend="cpu")
    ref, ref_lse = K.attention(q, k, v, causal=causal, block_mask=bm, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref, **helpers.TOL[F32])
    torch.testing.assert_close(lse, ref_lse, **helpers.LSE_TOL[F32])
    assert torch.isneginf(lse[:, :, 2 * bq: 3 * bq]).all() and (out[:, :, 2 * bq: 3 * bq] == 0).all()


@pytest.mark.parametrize("d, bq, bk, causal", [(8, 64, 64, False), (72, 16, 128, True), (128, 128, 16, False),
                                               (33, 32, 32, True)])
def test_native_kernel_matches_reference(helpers, monkeypatch, d, bq, bk, causal):
    """The native kernel at head dims it pads (8, 33, 72) or fills (128), every key block size, per-sample and
    per-head masks, GQA, odd lengths with Nk > Nq."""
    _force(monkeypatch, "native")
    b, hq, hkv, nq, nk = 2, 4, 2, 150, 211
    q, k, v = helpers.make_qkv(b, hq, hkv, nq, nk, d, F32)
    gen = torch.Generator().manual_seed(d)
    dense = torch.rand(b, hq, nq, nk, generator=gen) < 0.3
    dense[:, :, : bq] = True  # whole tiles as well as partial ones
    bm = BlockMask.from_dense(dense, bq, bk)
    out, lse = K.attention(q, k, v, causal=causal, block_mask=bm, return_lse=True, backend="cpu")
    ref, ref_lse = K.attention(q, k, v, causal=causal, block_mask=bm, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref, **helpers.TOL[F32])
    torch.testing.assert_close(lse, ref_lse, **helpers.LSE_TOL[F32])


def test_native_kernel_refuses_what_it_cannot_run(helpers):
    """Head dims past 128 and key blocks outside 16-128 stay on the torch path (and still match)."""
    q, k, v = helpers.make_qkv(1, 2, 2, 40, 40, 160, F32)
    bm = BlockMask.from_dense(torch.rand(1, 1, 40, 40, generator=torch.Generator().manual_seed(0)) < 0.5, 16, 16)
    assert not native.supports(q, bm) and native.supports(q[..., :128], bm)
    out = K.attention(q, k, v, block_mask=bm, backend="cpu")
    torch.testing.assert_close(out, K.attention(q, k, v, block_mask=bm, backend="reference"), **helpers.TOL[F32])


def _rows_reference(q, k, v, rows, visible):
    """Reference restricted to query rows ``rows``; ``visible(q_idx, kv_idx)`` gives the mask."""
    s = q[:, :, rows].float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~visible(rows[:, None], torch.arange(k.shape[2])), -math.inf)
    return torch.softmax(s, -1) @ v.float(), torch.logsumexp(s, -1)


@pytest.mark.parametrize("windowed", [False, True])
def test_cpu_large_n_on_row_subset(helpers, windowed):
    """N = 16384: the reference would need 2 GiB of scores; check 64 rows against a row-restricted oracle."""
    n, w = 16384, 700
    q, k, v = helpers.make_qkv(1, 2, 2, n, n, 64, F32)
    if windowed:
        def visible(i, j):
            return (i - j).abs() <= w

        bm = BlockMask.from_mask_mod(lambda b, h, i, j: visible(i, j), None, None, n, n, 128, 64)
        assert bm.density < 0.1
        out, lse = K.attention(q, k, v, block_mask=bm, return_lse=True, backend="cpu")
    else:
        def visible(i, j):
            return i >= j

        out, lse = K.attention(q, k, v, causal=True, return_lse=True, backend="cpu")
    rows = torch.cat([torch.arange(8), torch.randint(0, n, (48,), generator=torch.Generator().manual_seed(1)),
                      torch.arange(n - 8, n)])
    ref, ref_lse = _rows_reference(q, k, v, rows, visible)
    torch.testing.assert_close(out[:, :, rows], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[:, :, rows], ref_lse, atol=1e-5, rtol=1e-5)


def test_dispatch(monkeypatch, helpers):
    q, k, v = helpers.make_qkv(1, 2, 2, 5, 5, 16, F32)
    calls = []
    monkeypatch.setattr(K.cpu, "attention", lambda *a, **kw: calls.append("cpu"))
    monkeypatch.setattr(K.reference, "attention", lambda *a, **kw: calls.append("reference"))
    monkeypatch.delenv("MMATTN_KERNEL_BACKEND", raising=False)
    K.attention(q, k, v)
    monkeypatch.setenv("MMATTN_KERNEL_BACKEND", "reference")
    K.attention(q, k, v)
    K.attention(q, k, v, backend="cpu")
    assert calls == ["cpu", "reference", "cpu"]
    with pytest.raises(ValueError, match="backend must be one of"):
        K.attention(q, k, v, backend="cuda")


def test_shape_errors(helpers):
    q, k, v = helpers.make_qkv(1, 3, 2, 5, 5, 16, F32)
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        K.attention(q, k, v, backend="cpu")
    bm = BlockMask.from_dense(torch.ones(4, 4, dtype=torch.bool), 16, 16)
    q, k, v = helpers.make_qkv(1, 2, 2, 5, 5, 16, F32)
    with pytest.raises(ValueError, match="block mask is for"):
        K.attention(q, k, v, block_mask=bm, backend="cpu")


@pytest.mark.triton
def test_triton_rejects_head_dim_over_256(interpreted):
    q = torch.randn(1, 1, 3, 264)
    for op in (lambda: K.attention(q, q, q, backend="triton"),
               lambda: K.column_sums(q, q, torch.zeros(1, 1, 3), torch.ones(1, 3, dtype=torch.bool), backend="triton")):
        with pytest.raises(ValueError, match="head_dim=264 is out of range for the triton backend"):
            op()
    assert K.attention(q, q, q, backend="cpu").shape == q.shape
