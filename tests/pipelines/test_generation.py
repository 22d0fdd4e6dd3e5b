"""GenerationPipeline: baseline and methods side by side from the same seed, files and settings.json, and
from_settings reproducing a run."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmattn import STG, SoftPAG
from mmattn.pipelines.generation import GenerationPipeline


def test_images_compare_and_reproduce(tmp_path):
    method = SoftPAG(heads="transformer_blocks.1:0", strength=0.5, scale=2.0)
    gen = GenerationPipeline.from_pretrained("tiny/sd3", [method], call={"num_inference_steps": 2})
    run = gen.generate(["a red fox", "a blue bird"], seeds=[0, 5], out=tmp_path / "a", progress=False)
    assert list(run.images) == ["baseline", "softpag"] and len(run.images["softpag"]) == 4
    baseline = [np.asarray(im) for im in run.images["baseline"]]
    assert not np.array_equal(baseline[0], np.asarray(run.images["softpag"][0]))
    assert not np.array_equal(baseline[0], baseline[1])  # seeds differ
    settings = json.loads((tmp_path / "a" / "settings.json").read_text())
    assert settings["methods"] == [method.to_dict()] and settings["seeds"] == [0, 5]
    assert (tmp_path / "a" / "comparison.png").exists() and len(settings["outputs"]) == 8
    again = GenerationPipeline.from_settings(tmp_path / "a" / "settings.json").generate(out=tmp_path / "b",
                                                                                        progress=False)
    for label, images in run.images.items():
        for first, second in zip(images, again.images[label]):
            assert np.array_equal(np.asarray(first), np.asarray(second))
    for record in settings["outputs"]:
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / record["file"])),
                              np.asarray(Image.open(tmp_path / "b" / record["file"])))


def test_videos_are_animated_webp(tmp_path):
    gen = GenerationPipeline.from_pretrained("tiny/wan", [STG(layers="blocks.1")],
                                             call={"num_inference_steps": 1, "num_frames": 5})
    run = gen.generate(["a red fox"], out=tmp_path, progress=False)
    assert len(run.images["stg"][0]) == 5
    video = Image.open(tmp_path / "stg" / "prompt00_seed0.webp")
    assert video.n_frames == 5 and Image.open(tmp_path / "comparison.webp").n_frames == 5


def test_bad_input_is_refused_before_any_generation(tmp_path):
    gen = GenerationPipeline.from_pretrained("tiny/sd3", [SoftPAG(heads="transformer_blocks.99:0")])
    with pytest.raises(ValueError, match="transformer_blocks.99"):
        gen.generate(["a red fox"], out=tmp_path)
    with pytest.raises(ValueError, match=r"seed=-1: expected an int with 0 <= seed < 2\*\*64"):
        gen.generate(["a red fox"], seeds=[-1])
    with pytest.raises(ValueError, match="no prompt"):
        gen.generate([])
    assert not any(tmp_path.iterdir())
    (tmp_path / "bad.json").write_text(json.dumps({"model": "tiny/sd3"}))
    with pytest.raises(ValueError, match="lacks"):
        GenerationPipeline.from_settings(tmp_path / "bad.json")
    assert torch.is_grad_enabled()
