"""Test-wide settings: no model hub; Triton kernels in the interpreter where there is no CUDA.

Triton reads TRITON_INTERPRET when it decorates functions (triton.language helpers included, at its
first import), and transformers/diffusers import triton, so the switch is set here, before any test
module is imported.
"""

import os
import sys

import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    """The versions this run tests (CI runs the suite on the lowest and the newest supported)."""
    import diffusers
    import transformers

    return f"mmattn upstream: torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}"
