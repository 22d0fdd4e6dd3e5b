"""Tiny diffusers pipelines: registered, deterministic per seed, runnable end to end (also under PAG)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3PAGPipeline, StableDiffusionPAGPipeline
from PIL import Image

from mmattn.testing import build_tiny, tiny_names, tiny_spec

IMAGE_MODELS = ["tiny/sd", "tiny/sdxl", "tiny/sd3", "tiny/flux", "tiny/pixart", "tiny/sana", "tiny/hunyuandit", "tiny/qwenimage"]
VIDEO_MODELS = ["tiny/wan", "tiny/cogvideox", "tiny/ltx", "tiny/hunyuanvideo"]
MODELS = IMAGE_MODELS + VIDEO_MODELS
PROMPT = "a photo of a red cat"


def denoiser(pipe) -> torch.nn.Module:
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def generate(pipe, name: str, seed: int = 0, **overrides):
    """Call ``pipe`` with the model's defaults and a seeded generator."""
    kwargs = tiny_spec(name).defaults | overrides
    return pipe(PROMPT, **kwargs, generator=torch.Generator().manual_seed(seed))


def generate_array(pipe, name: str, **overrides) -> np.ndarray:
    """Images (batch, H, W, 3) or videos (batch, frames, H, W, 3) as float arrays."""
    out = generate(pipe, name, output_type="np", **overrides)
    return np.asarray(out.frames if name in VIDEO_MODELS else out.images)


def test_registered():
    assert set(IMAGE_MODELS) <= set(tiny_names("image"))
    assert set(VIDEO_MODELS) <= set(tiny_names("video"))
    for name in MODELS:
        defaults = tiny_spec(name).defaults
        assert {"height", "width", "num_inference_steps"} <= set(defaults), name
    assert tiny_spec("tiny/wan").defaults["num_frames"] == 5


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_pipeline_outputs_pil(name):
    defaults = tiny_spec(name).defaults
    images = generate(build_tiny(name), name).images
    assert len(images) == 1
    assert isinstance(images[0], Image.Image)
    assert images[0].size == (defaults["width"], defaults["height"])


@pytest.mark.slow
def test_video_pipeline_outputs_frames():
    defaults = tiny_spec("tiny/wan").defaults
    frames = generate(build_tiny("tiny/wan"), "tiny/wan").frames
    assert isinstance(frames, np.ndarray)
    assert frames.shape == (1, defaults["num_frames"], defaults["height"], defaults["width"], 3)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_same_seed_same_output(name):
    first = generate_array(build_tiny(name, seed=0), name)
    second = generate_array(build_tiny(name, seed=0), name)
    assert np.isfinite(first).all()
    assert first.min() >= 0.0 and first.max() <= 1.0
    assert first.std() > 0.0
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("name", MODELS)
def test_different_seed_different_weights(name):
    first = build_tiny(name, seed=0)
    second = build_tiny(name, seed=1)
    for a, b in zip(denoiser(first).parameters(), denoiser(second).parameters()):
        assert a.shape == b.shape
    assert any(not torch.equal(a, b) for a, b in zip(denoiser(first).parameters(), denoiser(second).parameters()))


@pytest.mark.parametrize("name", MODELS)
def test_models_in_eval_mode(name):
    pipe = build_tiny(name)
    modules = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]
    assert modules and not any(m.training for m in modules)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_bfloat16(name):
    pipe = build_tiny(name, dtype=torch.bfloat16)
    assert denoiser(pipe).dtype == torch.bfloat16
    assert np.isfinite(generate_array(pipe, name)).all()


def test_wan_keeps_fp32_modules():
    """Like ``from_pretrained(torch_dtype=...)``, Wan's RoPE, time embedder and norms stay float32."""
    transformer = build_tiny("tiny/wan", dtype=torch.bfloat16).transformer
    assert transformer.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_flux_layout():
    transformer = build_tiny("tiny/flux").transformer
    config = transformer.config
    assert config.guidance_embeds
    assert len(transformer.transformer_blocks) >= 1 and len(transformer.single_transformer_blocks) >= 1
    assert sum(config.axes_dims_rope) == config.attention_head_dim


@pytest.mark.slow
def test_sd_runs_under_pag():
    pipe = build_tiny("tiny/sd")
    pag = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    plain = generate_array(pag, "tiny/sd", pag_scale=0.0)
    guided = generate_array(pag, "tiny/sd", pag_scale=3.0)
    assert guided.shape == plain.shape and np.isfinite(guided).all()
    assert not np.array_equal(guided, plain)


@pytest.mark.slow
def test_sd3_runs_under_pag():
    # StableDiffusion3PAGPipeline takes no image_encoder / feature_extractor, which every SD3
    # pipeline lists among its components: from_pipe drops them.
    pipe = build_tiny("tiny/sd3")
    pag = StableDiffusion3PAGPipeline.from_pipe(pipe, pag_applied_layers=["blocks.1"])
    plain = generate_array(pag, "tiny/sd3", pag_scale=0.0)
    guided = generate_array(pag, "tiny/sd3", pag_scale=3.0)
    assert guided.shape == plain.shape and np.isfinite(guided).all()
    assert not np.array_equal(guided, plain)
