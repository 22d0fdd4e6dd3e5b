"""Upstream compatibility: one compat module, the tested range, both cache keyword spellings, kept signatures."""

import importlib.metadata
import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet

import mmattn
from mmattn import SoftPAG, _compat
from mmattn.processors.diffusion import PROCESSORS
from mmattn.testing import build_tiny

REPO = Path(__file__).resolve().parents[1]
# Everything that ships or measures (tests may reach into upstream modules on purpose: they are oracles).
SHIPPED = ("mmattn", "processors", "pipelines", "kernels", "bench", "demos")
PRIVATE_IMPORT = re.compile(r"^\s*(from\s+(transformers|diffusers)\.\S+\s+import|import\s+(transformers|diffusers)\.)",
                            re.MULTILINE)
PRIVATE_NAME = re.compile(r"\b(transformers|diffusers)(\.\w+)*\._\w+")


def test_only_the_compat_module_imports_upstream_internals():
    offenders = []
    for top in SHIPPED:
        for path in sorted((REPO / top).rglob("*.py")):
            if path == REPO / "mmattn" / "_compat.py":
                continue
            text = path.read_text()
            for pattern in (PRIVATE_IMPORT, PRIVATE_NAME):
                offenders += [f"{path.relative_to(REPO)}: {m.group(0).strip()}" for m in pattern.finditer(text)]
    assert not offenders, "import these through mmattn._compat:\n" + "\n".join(offenders)


def test_the_pattern_catches_private_imports():
    """The grep above would catch what processors/pruning.py used to import directly."""
    assert PRIVATE_IMPORT.search("from transformers.masking_utils import sdpa_mask")
    assert PRIVATE_IMPORT.search("    from diffusers.models.attention_dispatch import dispatch_attention_fn")
    assert PRIVATE_NAME.search("x = transformers.utils._private")
    assert not PRIVATE_IMPORT.search("from transformers import AutoProcessor")


def test_installed_versions_lie_in_the_declared_range():
    ranges = _compat.tested_range()
    assert set(ranges) == {"transformers", "diffusers"}
    for name, spec in ranges.items():
        assert "<" in spec and ">=" in spec, f"{name}: the tested range needs both bounds, got {spec!r}"
        assert SpecifierSet(spec).contains(importlib.metadata.version(name))


def test_apply_warns_once_outside_the_tested_range(monkeypatch):
    monkeypatch.setattr(_compat, "_checked", False)
    monkeypatch.setattr(_compat, "tested_range", lambda: {"transformers": ">=99.0,<99.1"})
    with pytest.warns(UserWarning, match=r"tested with transformers>=99.0,<99.1; transformers \S+ is installed"):
        _compat.check_versions()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.check_versions()  # once per process


def test_no_warning_inside_the_tested_range(monkeypatch):
    monkeypatch.setattr(_compat, "_checked", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _compat.check_versions()


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_cache_is_read_under_either_keyword(name):
    cache = object()
    assert _compat.cache_argument({name: cache, "attention_mask": None}) is cache
    assert _compat.cache_argument({"past_key_values": None}) is None


def test_output_cache_under_either_attribute():
    class Old:
        past_key_values = "old"

    class New:
        cache = "new"

    assert _compat.output_cache(Old()) == "old" and _compat.output_cache(New()) == "new"


@pytest.mark.parametrize("family", sorted(PROCESSORS))
def test_processors_mirror_the_upstream_call_signature(family):
    """Each mirrored diffusers processor still takes the arguments ours take, in the same order."""
    ours = _compat.call_parameters(PROCESSORS[family])
    theirs = _compat.call_parameters(_compat.mirrored_processor(family))
    assert ours == theirs, f"{family}: diffusers' {_compat.MIRRORED_PROCESSORS[family][1]} now takes {theirs}"


def test_denoiser_forward_keeps_its_signature_while_applied():
    pipe = build_tiny("tiny/sd3")
    denoiser = pipe.transformer
    before = inspect.signature(denoiser.forward)
    doc = denoiser.forward.__doc__
    with mmattn.apply(pipe, SoftPAG(heads="transformer_blocks.1:0", strength=0.5, scale=2.0)):
        assert denoiser.forward is not type(denoiser).forward.__get__(denoiser)
        assert inspect.signature(denoiser.forward) == before
        assert denoiser.forward.__doc__ == doc and denoiser.forward.__name__ == "forward"
        bound = inspect.signature(denoiser.forward).bind_partial(hidden_states=torch.zeros(1))
        assert "hidden_states" in bound.arguments
    assert inspect.signature(denoiser.forward) == before
