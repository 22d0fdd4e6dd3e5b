"""Nothing half-applied, ever: every install step of every method fails in turn (an exception, or Ctrl-C), and
the model is then exactly as before: same classes, processors, forwards, hooks and attention implementations,
and outputs bit-identical to a never-touched copy."""

import pytest
import torch

import mmattn
from mmattn import PAG, SEG, SLG, STG, DivPrune, FastV, PyramidDrop, SoftPAG, SparseVLM, VisionZip, ZeroTuning
from mmattn import text_attention
from mmattn.api import Changes
from mmattn.testing import build_tiny, tiny_spec
from mmattn.testing.media import question_inputs


def modules_of(target):
    if isinstance(target, torch.nn.Module):
        return {"model": target}
    return {k: v for k, v in target.components.items() if isinstance(v, torch.nn.Module)}


def fingerprint(target) -> list:
    state = [type(target)]
    config = getattr(target, "config", None)
    for sub in ("", "text_config", "vision_config"):
        part = getattr(config, sub, None) if sub else config
        state.append((sub, getattr(part, "_attn_implementation", None)))
    for root, module in modules_of(target).items():
        for name, m in module.named_modules():
            state.append((root, name, type(m), sorted(k for k in ("forward", "generate", "get_image_features") if k in vars(m)),
                          len(m._forward_hooks), len(m._forward_pre_hooks), id(getattr(m, "processor", None)),
                          len(text_attention._OPS.get(m, ()))))
    return state


def inject(monkeypatch, k: int, interrupt: bool):
    """Changes.add raises right after registering its k-th undo: the next install step fails."""
    count = [0]
    original = Changes.add

    def add(self, undo):
        original(self, undo)
        count[0] += 1
        if count[0] == k:
            raise KeyboardInterrupt if interrupt else RuntimeError("injected fault")

    monkeypatch.setattr(Changes, "add", add)
    return count


def fail_every_step(monkeypatch, target, config):
    """Apply ``config`` with a fault at step 1, 2, ... until one run gets through; after each fault the model's
    fingerprint equals the untouched one. Returns how many steps the install has."""
    before = fingerprint(target)
    k = 1
    while True:
        count = inject(monkeypatch, k, interrupt=k % 2 == 0)
        try:
            handle = mmattn.apply(target, config)
        except (RuntimeError, KeyboardInterrupt):
            assert fingerprint(target) == before, f"{config}: a fault after step {k} left changes behind"
            k += 1
            continue
        finally:
            monkeypatch.undo()
        handle.remove()
        assert count[0] < k and k > 1
        assert fingerprint(target) == before
        return k - 1


def pipeline_output(pipe, name):
    call = tiny_spec(name).defaults | {"output_type": "pt", "num_inference_steps": 2}
    return pipe("a red fox", generator=torch.Generator().manual_seed(0), **call).images


@pytest.mark.parametrize("config", [
    SoftPAG(heads="transformer_blocks.1:0,2;transformer_blocks.2:1", strength=0.5),
    PAG(heads="transformer_blocks.0-2"),
    SEG(heads="transformer_blocks.1:*;transformer_blocks.2:*", sigma=2.0),
    SLG(layers="transformer_blocks.1-2", start=0.0, stop=1.0),
    STG(layers="transformer_blocks.1-2", mode="attention"),
    [STG(layers="transformer_blocks.2", mode="residual"), SoftPAG(heads="transformer_blocks.1-2:0")],
], ids=["softpag", "pag", "seg", "slg", "stg", "stg+softpag"])
def test_guidance_install_steps_fail_in_turn(monkeypatch, config):
    pipe = build_tiny("tiny/sd3")
    steps = fail_every_step(monkeypatch, pipe, config)
    assert steps >= 3
    torch.testing.assert_close(pipeline_output(pipe, "tiny/sd3"), pipeline_output(build_tiny("tiny/sd3"), "tiny/sd3"),
                               atol=0, rtol=0)


@pytest.mark.parametrize("name, config", [
    ("tiny/llava", FastV(layer=1, keep=0.5)),
    ("tiny/gemma3", PyramidDrop(stages=((1, 0.5), (2, 0.25)))),
    ("tiny/llava", SparseVLM(layer=1, keep=0.5)),
    ("tiny/llava", DivPrune(keep=0.5)),
    ("tiny/llava", VisionZip(keep=0.5, contextual=2)),
    ("tiny/qwen2-vl", VisionZip(keep=0.5)),
    ("tiny/llava", ZeroTuning(heads="layers.0-1:*", gamma=2.0)),
    ("tiny/llava", [FastV(layer=1, keep=0.5), ZeroTuning(heads="layers.1:0", gamma=2.0)]),
])
def test_pruning_install_steps_fail_in_turn(monkeypatch, name, config):
    vlm = build_tiny(name)
    steps = fail_every_step(monkeypatch, vlm.model, config)
    assert steps >= 2
    inputs = question_inputs(vlm.processor)
    fresh = build_tiny(name)
    with torch.no_grad():
        torch.testing.assert_close(vlm.model(**inputs).logits, fresh.model(**inputs).logits, atol=0, rtol=0)
