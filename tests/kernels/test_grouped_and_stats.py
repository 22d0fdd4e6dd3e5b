"""grouped_attention(), row_probs(), column_sums(): CPU path and interpreted Triton against the reference."""

import pytest
import torch

import mmattn.kernels as K
from mmattn.kernels import BlockMask

F32, F16 = torch.float32, torch.float16
# (B, Hq, Hkv, N, D, dtype, groups, causal, sparse)
GROUPED = [
    (1, 2, 2, 17, 16, F32, 2, False, False),
    (1, 4, 2, 257, 64, F16, 4, True, False),
    (2, 2, 1, 100, 40, F32, 3, False, True),
]
# (B, Hq, Hkv, Nq, Nk, D, dtype, causal)
STATS = [
    (1, 2, 1, 100, 257, 40, F32, False),
    (2, 2, 2, 257, 257, 64, F16, True),
    (1, 2, 2, 1, 17, 16, F32, False),
]
BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.fixture
def backend(request):
    if request.param == "triton":
        request.getfixturevalue("interpreted")
    return request.param


def _groups(b, n, groups, seed=0):
    return torch.randint(0, groups, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", GROUPED, ids=str)
def test_grouped_matches_reference(helpers, backend, case):
    b, hq, hkv, n, d, dtype, groups, causal, sparse = case
    q, k, v = helpers.make_qkv(b, hq, hkv, n, n, d, dtype)
    gid = _groups(b, n, groups)
    bm = BlockMask.from_dense(helpers.random_mask(b, 1, n, n, 0.05, empty_rows=[3]), 32, 64) if sparse else None
    kw = dict(causal=causal, block_mask=bm, num_groups=groups)
    got = K.grouped_attention(q, k, v, gid, backend=backend, **kw)
    ref = K.grouped_attention(q, k, v, gid, backend="reference", **kw)
    tol = helpers.LSE_TOL[dtype]  # acc: P is rounded to the input dtype before P @ V, as in attention
    torch.testing.assert_close(got.acc, ref.acc, **helpers.TOL[dtype])
    for name in ("mass", "max", "lse"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), **tol, msg=name)
    # all weights 1 is plain attention; other weights match the reweighted reference
    plain = K.attention(q, k, v, causal=causal, block_mask=bm, backend="reference")
    torch.testing.assert_close(K.grouped_attention(q, k, v, gid, weights=[1.0] * groups, backend=backend, **kw),
                               plain, **helpers.TOL[dtype])
    w = [torch.rand(b, hq, n, generator=torch.Generator().manual_seed(g)) * 2 for g in range(groups)]
    torch.testing.assert_close(got.combine(w), ref.combine(w), **helpers.TOL[dtype])


def test_combine_is_exact_reweighting(helpers):
    """Weight w on group 1 equals softmax with log(w) added to that group's scores."""
    q, k, v = helpers.make_qkv(1, 2, 2, 30, 40, 16, F32)
    gid = _groups(1, 40, 2)
    w = torch.tensor([[[0.3], [2.0]]]).expand(1, 2, 30)  # per head
    got = K.grouped_attention(q, k, v, gid, weights=[1.0, w])
    s = q @ k.transpose(-1, -2) / 4 + torch.where(gid[:, None, None, :] == 1, w[..., None].log(), 0.0)
    torch.testing.assert_close(got, torch.softmax(s, -1) @ v, atol=1e-5, rtol=1e-5)


def test_grouped_rejects_bad_inputs(helpers):
    q, k, v = helpers.make_qkv(1, 2, 2, 5, 5, 16, F32)
    with pytest.raises(ValueError, match="key groups supported"):
        K.grouped_attention(q, k, v, torch.zeros(1, 5, dtype=torch.long), num_groups=5)
    with pytest.raises(ValueError, match="key_groups must be"):
        K.grouped_attention(q, k, v, torch.zeros(5, dtype=torch.long))
    result = K.grouped_attention(q, k, v, torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="expected 1 group weights"):
        result.combine([1.0, 2.0])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("case", STATS, ids=str)
def test_stats_match_reference(helpers, backend, case):
    b, hq, hkv, nq, nk, d, dtype, causal = case
    q, k, v = helpers.make_qkv(b, hq, hkv, nq, nk, d, dtype)
    _, lse = K.attention(q, k, v, causal=causal, return_lse=True, backend="reference")
    lse[:, :, -1] = float("-inf")  # a row that saw no key contributes nothing
    rows = torch.tensor(sorted({0, nq // 3, nq - 1}))
    kw = dict(causal=causal, q_positions=rows)
    torch.testing.assert_close(K.row_probs(q[:, :, rows], k, lse[:, :, rows], backend=backend, **kw),
                               K.row_probs(q[:, :, rows], k, lse[:, :, rows], backend="reference", **kw),
                               atol=1e-5, rtol=1e-4)
    chosen = torch.rand(b, nq, generator=torch.Generator().manual_seed(2)) < 0.4
    got = K.column_sums(q, k, lse, chosen, causal=causal, backend=backend)
    torch.testing.assert_close(got, K.column_sums(q, k, lse, chosen, causal=causal, backend="reference"),
                               atol=1e-4, rtol=1e-4)
    assert torch.equal(got, K.column_sums(q, k, lse, chosen, causal=causal, backend=backend))  # deterministic


def test_row_probs_sum_to_one(helpers):
    q, k, v = helpers.make_qkv(1, 4, 2, 50, 60, 40, F32)
    _, lse = K.attention(q, k, v, return_lse=True)
    p = K.row_probs(q[:, :, 10:13], k, lse[:, :, 10:13])
    torch.testing.assert_close(p.sum(-1), torch.ones(1, 4, 3))
    all_rows = K.column_sums(q, k, lse, torch.ones(1, 50, dtype=torch.bool))
    torch.testing.assert_close(all_rows.sum(-1), torch.full((1, 4), 50.0))
