"""Block-sparse attention layout shared by every backend.

A :class:`BlockMask` cuts the (Nq, Nk) score matrix into ``block_q x block_kv`` tiles. For each query
block it lists the key blocks to visit, split into

* **full** blocks: every (query, key) pair is visible; kernels skip element-wise masking;
* **partial** blocks: some pairs are visible; a dense boolean tile (``partial_mask``) says which.

Key blocks in neither list are never touched, so an empty block costs nothing. The batch and head
dimensions of every tensor are either the real size or 1 (broadcast), so one layout can serve all heads.

Masks are built from a dense boolean matrix (:meth:`BlockMask.from_dense`, for tests and small N) or from
a predicate (:meth:`BlockMask.from_mask_mod`) evaluated a slab of query rows at a time, so the N x N
matrix never exists at large N.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class BlockMask:
    """Per-query-block lists of visited key blocks.

    Shapes (``Bm`` in {1, B}, ``Hm`` in {1, Hq}, ``QB = ceil(Nq / block_q)``):

    * ``full_counts`` (Bm, Hm, QB) int32 and ``full_indices`` (Bm, Hm, QB, max_full) int32: full key blocks,
      valid in ``[..., :full_counts]``;
    * ``partial_counts`` / ``partial_indices``: the same for partial key blocks;
    * ``partial_mask`` (Bm, Hm, QB, max_partial, block_q, block_kv) bool: visibility inside each partial
      block, aligned with ``partial_indices`` (positions past Nq or Nk are False).
    """

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    full_counts: torch.Tensor
    full_indices: torch.Tensor
    partial_counts: torch.Tensor
    partial_indices: torch.Tensor
    partial_mask: torch.Tensor

    def __post_init__(self):
        for size in (self.block_q, self.block_kv):
            if size < 16 or size & (size - 1):
                raise ValueError(f"block sizes must be powers of two >= 16; got {size}")

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_kv)

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) tiles visited, averaged over batch and heads."""
        visited = (self.full_counts + self.partial_counts).float().mean().item()
        return visited / self.num_kv_blocks

    def to(self, device) -> "BlockMask":
        return BlockMask(self.q_len, self.kv_len, self.block_q, self.block_kv,
                         *(t.to(device) for t in (self.full_counts, self.full_indices, self.partial_counts,
                                                  self.partial_indices, self.partial_mask)))

    def to_dense(self) -> torch.Tensor:
        """The (Bm, Hm, Nq, Nk) boolean mask this layout describes (test and reference use only)."""
        bm, hm, qb = self.full_counts.shape
        kb = self.num_kv_blocks
        tiles = torch.zeros(bm, hm, qb, kb, self.block_q, self.block_kv, dtype=torch.bool,
                            device=self.full_counts.device)
        for counts, indices, values in ((self.full_counts, self.full_indices, None),
                                        (self.partial_counts, self.partial_indices, self.partial_mask)):
            valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
            b, h, q, j = valid.nonzero(as_tuple=True)
            tiles[b, h, q, indices[b, h, q, j].long()] = True if values is None else values[b, h, q, j]
        dense = tiles.permute(0, 1, 2, 4, 3, 5).reshape(bm, hm, qb * self.block_q, kb * self.block_kv)
        return dense[..., : self.q_len, : self.kv_len]

    def tile_codes(self) -> torch.Tensor:
        """(Bm, Hm, QB, KB) int32 per tile: 0 not visited, 1 full, ``2 + s`` partial (slot ``s`` of ``partial_mask``).

        The dense transpose of the per-query-block lists, ``QB x KB`` small ints per (batch, head): it lets a
        kernel that walks query blocks for a fixed key block (or looks up one tile per row) find its tile in O(1).
        """
        bm, hm, qb = self.full_counts.shape
        codes = torch.zeros(bm, hm, qb, self.num_kv_blocks + 1, dtype=torch.int32, device=self.full_counts.device)
        for counts, indices, base in ((self.full_counts, self.full_indices, None),
                                      (self.partial_counts, self.partial_indices, 2)):
            valid = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
            # invalid slots write into a spare last column that is dropped
            col = torch.where(valid, indices.long(), self.num_kv_blocks)
            val = torch.ones_like(indices) if base is None else \
                (torch.arange(indices.shape[-1], device=indices.device, dtype=torch.int32) + base).expand_as(indices)
            codes.scatter_(-1, col, torch.where(valid, val, 0).to(torch.int32))
        return codes[..., :-1].contiguous()

    def rows_visible(self, positions: torch.Tensor) -> torch.Tensor:
        """(Bm, Hm, R, Nk) bool visibility of the query rows ``positions`` (R,), without the Nq x Nk matrix."""
        positions = positions.to(self.full_counts.device).long()
        codes = self.tile_codes()
        bm, hm = codes.shape[:2]
        qb, r_in = positions // self.block_q, positions % self.block_q
        c = codes[:, :, qb]  # (Bm, Hm, R, KB)
        tiles = (c == 1)[..., None].expand(*c.shape, self.block_kv)
        if self.partial_mask.shape[3]:
            b = torch.arange(bm, device=c.device).view(-1, 1, 1, 1)
            h = torch.arange(hm, device=c.device).view(1, -1, 1, 1)
            part = self.partial_mask[b, h, qb.view(1, 1, -1, 1), (c - 2).clamp_min(0).long(), r_in.view(1, 1, -1, 1)]
            tiles = torch.where((c >= 2)[..., None], part, tiles)
        return tiles.reshape(bm, hm, len(positions), -1)[..., : self.kv_len]

    @classmethod
    def from_dense(cls, mask: torch.Tensor, block_q: int = 64, block_kv: int = 64) -> "BlockMask":
        """Layout of a boolean mask of shape (Nq, Nk) or (Bm, Hm, Nq, Nk); True = visible."""
        mask = mask.bool()
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        return cls._build(lambda start, stop: mask[:, :, start:stop], *mask.shape, block_q, block_kv)

    @classmethod
    def from_mask_mod(cls, mask_mod: MaskMod, batch: int | None, heads: int | None, q_len: int, kv_len: int,
                      block_q: int = 64, block_kv: int = 64, device=None,
                      rows_per_step: int | None = None) -> "BlockMask":
        """Layout of a predicate ``mask_mod(b, h, q_idx, kv_idx) -> bool`` written with broadcasting tensor ops.

        It is called with int32 index tensors shaped (Bm,1,1,1), (1,Hm,1,1), (1,1,R,1) and (1,1,1,Nk) for a slab
        of R query rows at a time (R = ``rows_per_step``, about 2^22 / Nk rows by default, a multiple of
        ``block_q``). ``batch`` or ``heads`` = None means the mask does not depend on it (Bm or Hm = 1).
        """
        device = torch.device(device or "cpu")
        bm, hm = batch or 1, heads or 1
        idx = dict(device=device, dtype=torch.int32)
        b = torch.arange(bm, **idx).view(-1, 1, 1, 1)
        h = torch.arange(hm, **idx).view(1, -1, 1, 1)
        kv_idx = torch.arange(kv_len, **idx).view(1, 1, 1, -1)

        def rows(start, stop):
            q_idx = torch.arange(start, stop, **idx).view(1, 1, -1, 1)
            return mask_mod(b, h, q_idx, kv_idx).expand(bm, hm, stop - start, kv_len)

        return cls._build(rows, bm, hm, q_len, kv_len, block_q, block_kv, rows_per_step)

    @classmethod
    def _build(cls, rows, bm, hm, q_len, kv_len, block_q, block_kv, rows_per_step=None) -> "BlockMask":
        """Tile the mask one slab of query blocks at a time; ``rows(start, stop)`` gives (Bm, Hm, stop-start, Nk)."""
        kb = -(-kv_len // block_kv)
        step = rows_per_step or max(1, (1 << 22) // max(1, bm * hm * kb * block_kv * block_q)) * block_q
        step = max(block_q, step // block_q * block_q)
        full, partial, tiles = [], [], []
        for start in range(0, q_len, step):
            stop = min(q_len, start + step)
            slab = rows(start, stop)
            qb = -(-(stop - start) // block_q)
            pad = (0, kb * block_kv - kv_len, 0, qb * block_q - (stop - start))
            shape = (bm, hm, qb, block_q, kb, block_kv)
            slab_any = torch.nn.functional.pad(slab, pad, value=False).reshape(shape)
            any_ = slab_any.view(torch.uint8).amax(dim=(3, 5)).bool()
            slab_all = torch.nn.functional.pad(slab, pad, value=True).reshape(shape)
            all_ = slab_all.view(torch.uint8).amin(dim=(3, 5)).bool()
            full.append(all_ & any_)
            partial.append(any_ & ~all_)
            # Keep only the partial tiles of this slab, never the slab itself.
            _, idx = _compact(partial[-1])
            idx = idx[..., None, None].long().expand(-1, -1, -1, -1, block_q, block_kv)
            tiles.append(torch.gather(slab_any.permute(0, 1, 2, 4, 3, 5), 3, idx))
        full_counts, full_indices = _compact(torch.cat(full, dim=2))
        partial_counts, partial_indices = _compact(torch.cat(partial, dim=2))
        width = partial_indices.shape[-1]
        partial_mask = torch.cat([torch.nn.functional.pad(t, (0, 0, 0, 0, 0, width - t.shape[3])) for t in tiles], 2)
        return cls(q_len, kv_len, block_q, block_kv, full_counts, full_indices, partial_counts, partial_indices,
                   partial_mask.contiguous())

    @classmethod
    def causal(cls, q_len: int, kv_len: int | None = None, block_q: int = 64, block_kv: int = 64,
               device=None) -> "BlockMask":
        """Top-left causal layout (query i sees keys j <= i), as ``torch`` SDPA's ``is_causal``."""
        return cls.from_mask_mod(lambda b, h, q, k: q >= k, None, None, q_len, kv_len or q_len, block_q, block_kv,
                                 device)


def _compact(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, KB) bool -> counts (…,) int32 and ascending indices of the True entries, padded with 0."""
    counts = flags.sum(-1, dtype=torch.int32)
    width = int(counts.max().item()) if counts.numel() else 0
    order = torch.sort((~flags).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    valid = torch.arange(width, device=flags.device) < counts[..., None]
    return counts, torch.where(valid, order, 0).to(torch.int32).contiguous()
