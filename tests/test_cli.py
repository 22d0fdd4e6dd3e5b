"""The console script: help, version, clear offline errors, and the main job on the embedded default."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mmattn

MMATTN = str(Path(sys.executable).with_name("mmattn"))


def cli(*args, cwd=None):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([MMATTN, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_version_and_help():
    assert cli("--version").stdout.strip() == f"mmattn {mmattn.__version__}"
    help_text = cli("--help").stdout
    for command in ("generate", "video", "vqa", "heads", "demo", "bench"):
        assert command in help_text


def test_unavailable_model_fails_with_one_clear_line():
    result = cli("generate", "--model", "someone/not-a-real-model")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "'someone/not-a-real-model'" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_setting_names_field_and_range():
    result = cli("generate", "--strength", "2")
    assert result.returncode == 1
    assert "strength=2.0 is out of range: expected a number in [0.0, 1.0]" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, expected", [
    (["--method", "seg", "--sigma", "inf"], {"method": "seg", "sigma": "inf", "scale": 3.0}),
    (["--method", "stg", "--mode", "residual", "--rescale", "0.5"], {"method": "stg", "mode": "residual", "rescale": 0.5}),
    (["--method", "slg", "--start", "0"], {"method": "slg", "start": 0.0, "stop": 0.2}),
])
def test_generate_other_methods(tmp_path, args, expected):
    result = cli("generate", "--no-baseline", "--out", str(tmp_path), *args)
    assert result.returncode == 0, result.stderr
    method = json.loads((tmp_path / "settings.json").read_text())["method"]
    assert expected.items() <= method.items(), method


@pytest.mark.slow
def test_video_writes_gifs_and_settings(tmp_path):
    result = cli("video", "--out", str(tmp_path), "--mode", "residual")
    assert result.returncode == 0, result.stderr
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["model"] == "tiny/wan" and settings["pipeline"] == "WanPipeline"
    assert settings["method"]["method"] == "stg" and settings["method"]["mode"] == "residual"
    from PIL import Image

    for name in ("baseline/prompt00_seed0.gif", "stg/prompt00_seed0.gif", "comparison.gif"):
        gif = Image.open(tmp_path / name)
        assert gif.n_frames == 5, name
    assert Image.open(tmp_path / "comparison.gif").width > Image.open(tmp_path / "stg/prompt00_seed0.gif").width


def test_video_refuses_an_image_model():
    result = cli("video", "--model", "tiny/sd3")
    assert result.returncode == 1 and "is of kind 'image'; this needs one of: video" in result.stderr


def test_pending_subcommand_says_so():
    result = cli("vqa")
    assert result.returncode == 2 and "not available in this version" in result.stderr


@pytest.mark.slow
def test_generate_writes_images_and_settings(tmp_path):
    out = tmp_path / "run"
    result = cli("generate", "--out", str(out), "--seed", "0", "--seed", "3", "--heads", "transformer_blocks.1:0,2", "--strength", "0.5")
    assert result.returncode == 0, result.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"] == "tiny/sd3" and settings["pipeline"] == "StableDiffusion3Pipeline"
    assert settings["method"] == {"method": "softpag", "heads": "transformer_blocks.1:0,2", "strength": 0.5, "scale": 3.0,
                                  "target": "identity", "start": 0.0, "stop": 1.0, "scope": "joint"}
    files = sorted(r["file"] for r in settings["outputs"])
    assert files == ["baseline/prompt00_seed0.png", "baseline/prompt00_seed3.png", "softpag/prompt00_seed0.png", "softpag/prompt00_seed3.png"]
    from PIL import Image

    for name in files:
        assert Image.open(out / name).size == (32, 32)
    assert (out / "comparison.png").exists()
    assert Image.open(out / "softpag/prompt00_seed0.png").tobytes() != Image.open(out / "baseline/prompt00_seed0.png").tobytes()


@pytest.mark.slow
def test_heads_search_writes_a_spec_generate_accepts(tmp_path):
    out = tmp_path / "heads"
    result = cli("heads", "search", "--layers", "transformer_blocks.1:*", "--rounds", "1", "--top-k", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "heads.json").read_text())
    assert saved["model"] == "tiny/sd3" and len(saved["chosen"]) == 2
    assert saved["spec"].startswith("transformer_blocks.1:") and (out / "checkpoint.json").exists()
    generated = cli("generate", "--heads", saved["spec"], "--no-baseline", "--out", str(tmp_path / "gen"))
    assert generated.returncode == 0, generated.stderr
