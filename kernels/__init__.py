"""mmattn.kernels: attention kernels (Triton on CUDA), their plain-torch references and CPU paths.

Installed only as ``mmattn.kernels``; this folder is never a top-level package.

Ops (see :mod:`.dispatch` for conventions and backend choice):

* :func:`attention`: flash forward, optional causal / block-sparse :class:`BlockMask`, optional LSE;
* :func:`grouped_attention`: up to 4 key groups under one shared max, reweighted exactly afterwards
  (:func:`combine_groups`);
* :func:`row_probs`, :func:`column_sums`: probability statistics from a saved LSE, without the N x N matrix.

SoftPAG's identity blend ``(1 - u) * attn + u * V`` needs no kernel: it is one elementwise op on the output.
"""

from .dispatch import (BACKENDS, MAX_GROUPS, GroupedAttention, attention, column_sums, combine_groups, grouped_attention,
                       row_probs)
from .mask import BlockMask

__all__ = ["BACKENDS", "MAX_GROUPS", "BlockMask", "GroupedAttention", "attention", "column_sums", "combine_groups",
           "grouped_attention", "row_probs"]
