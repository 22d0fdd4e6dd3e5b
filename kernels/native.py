"""The native CPU kernel for block-sparse attention (``cpu_sparse.cpp``), compiled on first use.

Each (batch, head, query block) reads the key blocks its :class:`BlockMask` lists where they lie, with an online
softmax over them; a partial block applies its boolean tile as a predicate, so no key row is gathered and no
additive mask is built. fp32, head dims up to 128, key blocks of 16, 32, 64 or 128, any query block size;
threads as torch's.

Built with ``g++ -O3 -march=native`` into ``$MMATTN_CACHE`` (default ``~/.cache/mmattn``), one library per source
and CPU. Where no compiler is found or the build fails, :func:`load` returns None and the CPU path keeps its torch
implementation; ``MMATTN_NATIVE=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from .mask import BlockMask

SOURCE = Path(__file__).with_name("cpu_sparse.cpp")
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC",
         "-fopenmp"]
MAX_HEAD_DIM = 128


def _cpu_id() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() + platform.machine()


@lru_cache(maxsize=1)
def load():
    """The compiled library, or None (no compiler, a failed build, or ``MMATTN_NATIVE=0``)."""
    if os.environ.get("MMATTN_NATIVE", "1") == "0":
        return None
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        return None
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + _cpu_id().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MMATTN_CACHE", Path.home() / ".cache" / "mmattn"))
    library = cache / f"cpu_sparse-{key}.so"
    if not library.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then moved: no half-written library
                built = Path(tmp) / library.name
                subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True)
                os.replace(built, library)
        except (OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", b"") or b""
            warnings.warn(f"mmattn: the native CPU kernel did not build ({error}; {detail.decode()[:500]}); "
                          "block-sparse attention on CPU uses the torch path", RuntimeWarning, stacklevel=2)
            return None
    lib = ctypes.CDLL(str(library))
    lib.mmattn_block_sparse_f32.restype = ctypes.c_int
    return lib


def supports(q: torch.Tensor, bm: BlockMask) -> bool:
    """Whether the kernel runs this call: CPU tensors, a built library, key blocks of 16 to 128, head dims up to 128."""
    return (q.device.type == "cpu" and bm.block_kv in (16, 32, 64, 128) and q.shape[-1] <= MAX_HEAD_DIM
            and load() is not None)


def block_sparse_attention(q, k, v, scale: float, causal: bool, bm: BlockMask):
    """``q`` (B, Hq, Nq, D), ``k``/``v`` (B, Hkv, Nk, D) -> output (B, Hq, Nq, D) fp32 and LSE (B, Hq, Nq), -inf
    (output 0) for rows that see no key. ``causal`` additionally hides keys after the query's position."""
    b, hq, nq, d = q.shape
    hkv, nk, bk = k.shape[1], k.shape[2], bm.block_kv
    bm_, hm_, qb = bm.full_counts.shape
    if qb != -(-nq // bm.block_q) or bm_ not in (1, b) or hm_ not in (1, hq):
        raise ValueError(f"block mask of {bm_} x {hm_} x {qb} query blocks does not fit q of shape {tuple(q.shape)}")
    dp = -(-d // 16) * 16
    nkb = max(1, bm.num_kv_blocks)
    q = q.float().contiguous()
    # keys as (B, Hkv, key block, Dp, block_kv) and values as (B, Hkv, key blocks * block_kv, Dp), zero-padded
    kp = F.pad(k.float(), (0, dp - d, 0, nkb * bk - nk))
    kt = kp.view(b, hkv, nkb, bk, dp).transpose(-1, -2).contiguous()
    vp = F.pad(v.float(), (0, dp - d, 0, nkb * bk - nk)).contiguous()
    out = torch.empty(b, hq, nq, d)
    lse = torch.empty(b, hq, nq)
    parts = [t.to(torch.int32).contiguous()
             for t in (bm.full_counts, bm.full_indices, bm.partial_counts, bm.partial_indices)]
    partial_mask = bm.partial_mask.contiguous().view(torch.uint8)
    sizes = torch.tensor([b, hq, hkv, nq, nk, d, dp, nkb, bm_, hm_, qb, bm.block_q, parts[1].shape[-1],
                          parts[3].shape[-1]], dtype=torch.int64)

    def ptr(t):
        return ctypes.c_void_p(t.data_ptr())

    status = load().mmattn_block_sparse_f32(
        ptr(q), ptr(kt), ptr(vp), ptr(out), ptr(lse), *(ptr(t) for t in parts), ptr(partial_mask), ptr(sizes),
        ctypes.c_int(bk), ctypes.c_int(int(causal)), ctypes.c_float(scale), ctypes.c_int(torch.get_num_threads()))
    if status:
        raise RuntimeError(f"the native CPU kernel refused head dim {d} (padded {dp})")
    return out, lse


__all__ = ["block_sparse_attention", "load", "supports"]
