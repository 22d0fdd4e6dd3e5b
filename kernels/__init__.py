"""mmattn.kernels: attention kernels (Triton on CUDA), their plain-torch references and CPU paths.

Installed only as ``mmattn.kernels``; this folder is never a top-level package.

Ops (see :mod:`.dispatch` for conventions and backend choice):

* :func:`attention`: flash forward, optional causal / block-sparse :class:`BlockMask`, optional LSE;
* :func:`grouped_attention`: up to 4 key groups under one shared max, reweighted exactly afterwards
  (:func:`combine_groups`);
* :func:`row_probs`, :func:`column_sums`: probability statistics from a saved LSE, without the N x N matrix.

SoftPAG's identity blend ``(1 - u) * attn + u * V`` needs no kernel: it is one elementwise op on the output.
"""

if __name__ == "kernels":
    # Found as a top-level ``kernels`` because Python runs from the repository root (``python -m ...``): that name
    # belongs to Hugging Face's ``kernels``, which transformers >= 5.25 imports. Hand the import over to it, or,
    # where it is not installed, to an empty module without ``__file__`` (what transformers reads as "absent").
    import importlib.util as _util
    import os as _os
    import sys as _sys
    from importlib.machinery import ModuleSpec as _ModuleSpec
    from importlib.machinery import PathFinder as _PathFinder

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _PathFinder.find_spec("kernels", [p for p in _sys.path if _os.path.abspath(p or ".") != _root])
    # the import statement returns what sys.modules holds once this file has run
    _sys.modules["kernels"] = _util.module_from_spec(_spec or _ModuleSpec("kernels", None))
    if _spec is not None:
        _spec.loader.exec_module(_sys.modules["kernels"])
else:
    from .dispatch import (BACKENDS, MAX_GROUPS, GroupedAttention, attention, column_sums, combine_groups,
                           grouped_attention, row_probs)
    from .mask import BlockMask

    __all__ = ["BACKENDS", "MAX_GROUPS", "BlockMask", "GroupedAttention", "attention", "column_sums", "combine_groups",
               "grouped_attention", "row_probs"]
