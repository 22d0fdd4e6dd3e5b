"""apply() refuses what it cannot patch, before installing anything, and says what to pass instead."""

import pytest
import torch

import mmattn
from mmattn import FastV, SoftPAG
from mmattn.testing import build_tiny

DENOISERS = [("tiny/sd", "unet", "UNet2DConditionModel"), ("tiny/sd3", "transformer", "SD3Transformer2DModel"),
             ("tiny/flux", "transformer", "FluxTransformer2DModel"), ("tiny/wan", "transformer", "WanTransformer3DModel"),
             ("tiny/pixart", "transformer", "PixArtTransformer2DModel"),
             ("tiny/sana", "transformer", "SanaTransformer2DModel"),
             ("tiny/cogvideox", "transformer", "CogVideoXTransformer3DModel"),
             ("tiny/ltx", "transformer", "LTXVideoTransformer3DModel"),
             ("tiny/hunyuandit", "transformer", "HunyuanDiT2DModel"),
             ("tiny/qwenimage", "transformer", "QwenImageTransformer2DModel"),
             ("tiny/hunyuanvideo", "transformer", "HunyuanVideoTransformer3DModel")]


def untouched(denoiser) -> bool:
    """No processor of ours and the class's own forward."""
    processors = denoiser.attn_processors.values()
    return "forward" not in denoiser.__dict__ and not any(type(p).__module__.startswith("mmattn") for p in processors)


@pytest.mark.parametrize("name, attr, denoiser_class", DENOISERS)
def test_a_bare_denoiser_is_refused_naming_the_pipeline(name, attr, denoiser_class):
    denoiser = getattr(build_tiny(name), attr)
    with pytest.raises(TypeError, match=rf"apply\(\) got a {denoiser_class}, a part of a diffusers pipeline; pass the "
                                        rf"pipeline that holds it \(mmattn.apply\(pipe, ...\), not mmattn.apply\(pipe.{attr}"):
        mmattn.apply(denoiser, SoftPAG(heads="any"))
    assert untouched(denoiser)


@pytest.mark.parametrize("name, attr, denoiser_class", DENOISERS[:2])
def test_a_torch_compiled_denoiser_is_refused_naming_compile_in_place(name, attr, denoiser_class):
    pipe = build_tiny(name)
    denoiser = getattr(pipe, attr)
    with pytest.raises(TypeError, match=rf"OptimizedModule \(torch.compile of {denoiser_class}\).*module.compile\(\) "
                                        r"instead of module = torch.compile\(module\), and pass the pipeline"):
        mmattn.apply(torch.compile(denoiser), SoftPAG(heads="any"))
    setattr(pipe, attr, torch.compile(denoiser))
    with pytest.raises(ValueError, match=rf"{type(pipe).__name__}.{attr} is an OptimizedModule \(torch.compile of "
                                         rf"{denoiser_class}\).*pipe.{attr}.compile\(\)"):
        mmattn.apply(pipe, SoftPAG(heads="any"))
    assert untouched(denoiser)


def test_a_denoiser_compiled_in_place_is_accepted():
    pipe = build_tiny("tiny/sd3")
    pipe.transformer.compile(backend="eager")
    with mmattn.apply(pipe, SoftPAG(heads="transformer_blocks.1:0")):
        assert not untouched(pipe.transformer)
    assert untouched(pipe.transformer)


def test_a_tiny_vlm_wrapper_is_refused_naming_its_model():
    vlm = build_tiny("tiny/llava")
    with pytest.raises(TypeError, match=r"apply\(\) got a TinyVLM, which holds a model and its processor; pass its .model"):
        mmattn.apply(vlm, FastV())
    with pytest.raises(TypeError, match=r"OptimizedModule \(torch.compile of LlavaForConditionalGeneration\).*"
                                        r"module.compile\(\) instead of module = torch.compile\(module\)$"):
        mmattn.apply(torch.compile(vlm.model), FastV())
    with mmattn.apply(vlm.model, FastV(layer=1)):
        pass
