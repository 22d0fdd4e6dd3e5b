"""row_probs() / column_sums() with a BlockMask: CPU path and interpreted Triton against the reference, and
consistency with the LSE that attention() saved under the same mask."""

import pytest
import torch

import mmattn.kernels as K
from mmattn.kernels import BlockMask

F32, F16 = torch.float32, torch.float16
# (B, Hq, Hkv, Nq, Nk, D, dtype, causal, (block_q, block_kv, per-(batch, head) mask))
CASES = [
    (1, 2, 1, 100, 257, 40, F32, False, (32, 64, True)),
    (2, 2, 2, 70, 70, 16, F16, True, (16, 32, False)),
    (1, 2, 2, 17, 33, 64, F32, False, (64, 16, True)),
    (2, 4, 2, 45, 90, 24, F16, False, (16, 16, True)),
]
BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.fixture
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("interpreted")
    return request.param


def _setup(helpers, case, density=0.05):
    b, hq, hkv, nq, nk, d, dtype, causal, (bq, bk, per_head) = case
    q, k, v = helpers.make_qkv(b, hq, hkv, nq, nk, d, dtype)
    empty = [0, nq // 2]
    dense = helpers.random_mask(b if per_head else 1, hq if per_head else 1, nq, nk, density, empty_rows=empty)
    if nq > 40:  # a whole query block that sees nothing, and a sparse one with a few isolated pairs
        dense[..., 16:32, :] = False
        dense[..., 33, 5] = True
    return q, k, v, BlockMask.from_dense(dense, bq, bk), dense, empty


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_masked_stats_match_reference(helpers, backend, case):
    q, k, v, bm, dense, empty = _setup(helpers, case)
    nq, causal = q.shape[2], case[7]
    _, lse = K.attention(q, k, v, causal=causal, block_mask=bm, return_lse=True, backend="reference")
    rows = torch.tensor(sorted({0, 1, nq // 3, nq // 2, nq - 1}))
    kw = dict(causal=causal, q_positions=rows, block_mask=bm)
    got = K.row_probs(q[:, :, rows], k, lse[:, :, rows], backend=backend, **kw)
    want = K.row_probs(q[:, :, rows], k, lse[:, :, rows], backend="reference", **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    hidden = ~dense[:, :, rows].expand_as(got)
    assert (got[hidden] == 0).all()  # masked pairs are exactly 0
    for density in (0.4, 0.03):  # most query blocks selected; few (whole blocks without a selected row)
        chosen = torch.rand(q.shape[0], nq, generator=torch.Generator().manual_seed(2)) < density
        got = K.column_sums(q, k, lse, chosen, causal=causal, block_mask=bm, backend=backend)
        want = K.column_sums(q, k, lse, chosen, causal=causal, block_mask=bm, backend="reference")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert torch.equal(got, K.column_sums(q, k, lse, chosen, causal=causal, block_mask=bm, backend=backend))
    none = torch.zeros(q.shape[0], nq, dtype=torch.bool)
    assert (K.column_sums(q, k, lse, none, causal=causal, block_mask=bm, backend=backend) == 0).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_masked_stats_consistent_with_saved_lse(helpers, backend, case):
    """With the LSE attention saved under the mask: rows sum to 1 (0 if empty); column sums = sum of rows."""
    q, k, v, bm, dense, empty = _setup(helpers, case)
    b, hq, nq = q.shape[:3]
    causal = case[7]
    _, lse = K.attention(q, k, v, causal=causal, block_mask=bm, return_lse=True, backend=backend)
    p = K.row_probs(q, k, lse, causal=causal, q_positions=torch.arange(nq) if causal else None, block_mask=bm,
                    backend=backend)
    sums = p.sum(-1)
    seen = torch.isfinite(lse)
    assert not seen[:, :, empty].any()
    torch.testing.assert_close(sums, seen.float(), atol=1e-4, rtol=0)
    allq = torch.ones(b, nq, dtype=torch.bool)
    torch.testing.assert_close(K.column_sums(q, k, lse, allq, causal=causal, block_mask=bm, backend=backend),
                               p.sum(-2), atol=1e-4, rtol=1e-5)
    chosen = torch.rand(b, nq, generator=torch.Generator().manual_seed(3)) < 0.3
    torch.testing.assert_close(K.column_sums(q, k, lse, chosen, causal=causal, block_mask=bm, backend=backend),
                               (p * chosen[:, None, :, None]).sum(-2), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_column_sums_skips_unselected_query_blocks(helpers, backend):
    """Selected rows in only two query blocks (one the ragged last): same sums as the reference, no mask."""
    q, k, v = helpers.make_qkv(2, 2, 1, 150, 90, 16, F32)
    _, lse = K.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    chosen = torch.zeros(2, 150, dtype=torch.bool)
    chosen[0, [70, 149]] = True
    chosen[1, 3] = True
    got = K.column_sums(q, k, lse, chosen, causal=True, backend=backend)
    torch.testing.assert_close(got, K.column_sums(q, k, lse, chosen, causal=True, backend="reference"),
                               atol=1e-5, rtol=1e-5)


def test_row_probs_mask_argument_errors(helpers):
    q, k, v = helpers.make_qkv(1, 2, 2, 20, 30, 16, F32)
    bm = BlockMask.from_dense(torch.ones(20, 30, dtype=torch.bool), 16, 16)
    lse = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="needs q_positions"):
        K.row_probs(q[:, :, :3], k, lse, block_mask=bm)
    with pytest.raises(ValueError, match="block mask is for"):
        K.row_probs(q[:, :, :3], k[:, :, :20], lse, q_positions=torch.arange(3), block_mask=bm)
    with pytest.raises(ValueError, match="block mask is for"):
        K.column_sums(q[:, :, :10], k, lse, torch.ones(1, 10, dtype=torch.bool), block_mask=bm)
