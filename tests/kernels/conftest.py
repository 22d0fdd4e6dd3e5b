"""Kernel test settings and shared checks.

TRITON_INTERPRET is switched on by tests/conftest.py where there is no CUDA. If triton was imported
before that (a plugin, say), the interpreter tests skip; run ``TRITON_INTERPRET=1 pytest -m triton tests/kernels``.
"""

import sys

import pytest
import torch

# Tolerances against the fp32 reference computed from the same (rounded) inputs. fp32: kernels use exact fp32
# dots. fp16: the output is rounded to fp16 (rel. 5e-4) and P is rounded to fp16 before P @ V.
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
LSE_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=2e-4, rtol=1e-4),
           torch.bfloat16: dict(atol=2e-3, rtol=1e-3)}


def make_qkv(b, hq, hkv, nq, nk, d, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((hq, nq), (hkv, nk), (hkv, nk)))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def random_mask(b, h, nq, nk, density, empty_rows=(), seed=0):
    """Random (b, h, nq, nk) mask with a local band (so partial and full blocks occur) and some empty rows."""
    g = torch.Generator().manual_seed(seed)
    band = (torch.arange(nq)[:, None] - torch.arange(nk)).abs() < max(1, nk // 4)
    mask = (torch.rand(b, h, nq, nk, generator=g) < density) | band
    mask[:, :, list(empty_rows)] = False
    return mask


@pytest.fixture
def helpers():
    return sys.modules[__name__]


@pytest.fixture
def interpreted():
    from mmattn.kernels import triton_attention

    if not triton_attention.INTERPRETED:
        pytest.skip("triton was imported without TRITON_INTERPRET=1; run TRITON_INTERPRET=1 pytest -m triton")
    return triton_attention
