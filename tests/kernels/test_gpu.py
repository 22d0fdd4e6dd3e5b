"""Compiled Triton kernels on CUDA against the reference (fp16 / bf16); skipped without CUDA."""

import pytest
import torch

import mmattn.kernels as K
from mmattn.kernels import BlockMask

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
DTYPES = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d, hkv, causal", [(1, 16, 2, False), (257, 40, 1, True), (1000, 64, 2, False),
                                              (513, 128, 4, True), (300, 256, 2, False)])
def test_attention(helpers, dtype, n, d, hkv, causal):
    q, k, v = helpers.make_qkv(2, 4, hkv, n, n, d, dtype, "cuda")
    out, lse = K.attention(q, k, v, causal=causal, return_lse=True)
    ref, ref_lse = K.attention(q, k, v, causal=causal, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref, **helpers.TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **helpers.LSE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_grouped_and_stats(helpers, dtype):
    n = 700
    q, k, v = helpers.make_qkv(2, 4, 2, n, n, 64, dtype, "cuda")
    bm = BlockMask.from_dense(helpers.random_mask(2, 4, n, n, 0.02, empty_rows=[5]), 128, 64).to("cuda")
    out, lse = K.attention(q, k, v, block_mask=bm, return_lse=True)
    ref, ref_lse = K.attention(q, k, v, block_mask=bm, return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref, **helpers.TOL[dtype])
    torch.testing.assert_close(lse, ref_lse, **helpers.LSE_TOL[dtype])
    gid = torch.randint(0, 4, (2, n), device="cuda")
    got, want = (K.grouped_attention(q, k, v, gid, causal=True, backend=b) for b in ("triton", "reference"))
    torch.testing.assert_close(got.lse, want.lse, **helpers.LSE_TOL[dtype])
    torch.testing.assert_close(got.combine([1, 2, 0.5, 1]), want.combine([1, 2, 0.5, 1]), **helpers.TOL[dtype])
    chosen = torch.rand(2, n, device="cuda") < 0.3
    torch.testing.assert_close(K.column_sums(q, k, lse, chosen), K.column_sums(q, k, lse, chosen, backend="reference"),
                               atol=2e-2, rtol=1e-2)
    rows = torch.tensor([0, 5, 699], device="cuda")
    torch.testing.assert_close(K.row_probs(q[:, :, rows], k, lse[:, :, rows]),
                               K.row_probs(q[:, :, rows], k, lse[:, :, rows], backend="reference"),
                               atol=1e-3, rtol=1e-2)
