"""BlockMask: compaction into full / partial lists, round trip, predicate construction by slabs."""

import pytest
import torch

from mmattn.kernels import BlockMask


@pytest.mark.parametrize("shape, bq, bk",
                         [((1, 1, 100, 257), 32, 64), ((2, 3, 70, 33), 16, 16), ((1, 2, 1, 5), 64, 64)])
def test_dense_round_trip(helpers, shape, bq, bk):
    mask = helpers.random_mask(*shape, density=0.05, empty_rows=[0])
    bm = BlockMask.from_dense(mask, bq, bk)
    assert torch.equal(bm.to_dense(), mask)
    assert bm.full_counts.shape == (shape[0], shape[1], -(-shape[2] // bq))


def test_full_and_partial_lists():
    mask = torch.zeros(64, 96, dtype=torch.bool)
    mask[:32, 32:64] = True          # query block 0: key block 1 full
    mask[32:40, 0:3] = True          # query block 1: key block 0 partial
    mask[32:64, 64:96] = True        # query block 1: key block 2 full
    bm = BlockMask.from_dense(mask, 32, 32)
    assert bm.full_counts.flatten().tolist() == [1, 1] and bm.partial_counts.flatten().tolist() == [0, 1]
    assert bm.full_indices[0, 0, :, 0].tolist() == [1, 2] and bm.partial_indices[0, 0, 1, 0].item() == 0
    assert torch.equal(bm.partial_mask[0, 0, 1, 0], mask[32:64, 0:32])
    assert bm.density == pytest.approx(3 / 6)


def test_ragged_last_blocks_count_as_full():
    bm = BlockMask.from_dense(torch.ones(40, 50, dtype=torch.bool), 32, 32)
    assert bm.partial_counts.sum() == 0 and bm.full_counts.flatten().tolist() == [2, 2]


def test_mask_mod_matches_dense_in_slabs():
    def window(b, h, q, k):
        return ((q - k).abs() <= 20 + 10 * h) & (b >= 0)

    bm = BlockMask.from_mask_mod(window, 2, 3, 150, 130, 32, 16, rows_per_step=64)
    q, k = torch.arange(150)[:, None], torch.arange(130)
    dense = torch.stack([torch.stack([(q - k).abs() <= 20 + 10 * h for h in range(3)])] * 2)
    assert torch.equal(bm.to_dense(), dense)
    assert torch.equal(BlockMask.from_dense(dense, 32, 16).partial_mask, bm.partial_mask)


def test_causal_layout():
    bm = BlockMask.causal(100, block_q=32, block_kv=32)
    assert torch.equal(bm.to_dense()[0, 0], torch.ones(100, 100, dtype=torch.bool).tril())


def test_block_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="powers of two"):
        BlockMask.from_dense(torch.ones(8, 8, dtype=torch.bool), 24, 32)


@pytest.mark.parametrize("shape, bq, bk",
                         [((1, 1, 100, 257), 32, 64), ((2, 3, 70, 33), 16, 16), ((1, 2, 1, 5), 64, 64)])
def test_tile_codes_and_rows_visible(helpers, shape, bq, bk):
    mask = helpers.random_mask(*shape, density=0.05, empty_rows=[0])
    bm = BlockMask.from_dense(mask, bq, bk)
    codes = bm.tile_codes()
    assert codes.shape == (shape[0], shape[1], bm.num_q_blocks, bm.num_kv_blocks)
    for b in range(shape[0]):
        for h in range(shape[1]):
            for qb in range(bm.num_q_blocks):
                full = bm.full_indices[b, h, qb, : bm.full_counts[b, h, qb]].tolist()
                part = bm.partial_indices[b, h, qb, : bm.partial_counts[b, h, qb]].tolist()
                want = [1 if j in full else 2 + part.index(j) if j in part else 0 for j in range(bm.num_kv_blocks)]
                assert codes[b, h, qb].tolist() == want
    rows = torch.tensor([shape[2] - 1, 0, shape[2] // 2, shape[2] - 1])
    assert torch.equal(bm.rows_visible(rows), mask[:, :, rows])
    assert torch.equal(bm.rows_visible(torch.arange(shape[2])), mask)
