"""The console script: help, version, clear offline errors, and the main job on the embedded default."""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

import mmattn
from mmattn import cli as cli_module
from mmattn import hub
from mmattn.cli import main
from mmattn.testing import build_tiny

MMATTN = str(Path(sys.executable).with_name("mmattn"))
REPO = Path(__file__).resolve().parents[1]


def quick_model(args) -> list[str]:
    """generate and heads search default to the shipped shapes-t2i (20 steps at 64 x 64); these tests run on
    tiny/sd3 unless they name a model (test_generate_defaults_to_shapes_t2i covers the default)."""
    args = list(args)
    at = 1 if args[:1] == ["generate"] else 2 if args[:2] == ["heads", "search"] else None
    if at is not None and "--model" not in args and "--help" not in args:
        args[at:at] = ["--model", "tiny/sd3"]
    return args


def cli(*args, cwd=None):
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    return subprocess.run([MMATTN, *quick_model(args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


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
    (["--method", "slg", "--no-batch-branches"], {"method": "slg", "batch_branches": False}),
])
def test_generate_other_methods(tmp_path, args, expected):
    result = cli("generate", "--no-baseline", "--out", str(tmp_path), *args)
    assert result.returncode == 0, result.stderr
    method = json.loads((tmp_path / "settings.json").read_text())["methods"][0]
    assert expected.items() <= method.items(), method


@pytest.mark.slow
def test_video_writes_animated_webps_and_settings(tmp_path):
    result = cli("video", "--out", str(tmp_path), "--mode", "residual")
    assert result.returncode == 0, result.stderr
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["model"] == "tiny/wan" and settings["pipeline"] == "WanPipeline"
    assert settings["methods"][0]["method"] == "stg" and settings["methods"][0]["mode"] == "residual"
    from PIL import Image

    for name in ("baseline/prompt00_seed0.webp", "stg/prompt00_seed0.webp", "comparison.webp"):
        video = Image.open(tmp_path / name)
        assert video.n_frames == 5, name
    assert Image.open(tmp_path / "comparison.webp").width > Image.open(tmp_path / "stg/prompt00_seed0.webp").width


def test_video_refuses_an_image_model():
    result = cli("video", "--model", "tiny/sd3")
    assert result.returncode == 1 and "is of kind 'image'; this needs one of: video" in result.stderr


@pytest.mark.parametrize("command", [["generate"], ["video"], ["heads", "search"], ["eval", "vqa"], ["eval", "gen"],
                                     ["vqa"], ["demo"], ["bench"]])
def test_every_subcommand_help_ends_with_an_example(command, capsys):
    status, out, _ = run(capsys, *command, "--help")
    assert status == 0 and f"example: mmattn {command[0]}" in out


def test_bench_runs_a_benchmark_script(tmp_path):
    out = tmp_path / "perturbation.json"
    result = cli("bench", "perturbation", "--layers", "3", "--heads", "2", "--head-dim", "8", "--latent", "8",
                 "--text-tokens", "4", "--repeats", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert set(json.loads(out.read_text())["ratios"]) >= {"softpag_vs_cfg", "pag_middle_forked_vs_cfg"}


@pytest.mark.slow
def test_demo_serves_the_app(tmp_path):
    """`mmattn demo --port P` serves the Gradio app until stopped."""
    import socket
    import time
    import urllib.request

    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mmattn.cli", "demo", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        deadline, page = time.time() + 120, ""
        while time.time() < deadline and "mmattn demo" not in page:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                time.sleep(1)
        assert "mmattn demo" in page
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_generate_writes_images_and_settings(tmp_path):
    out = tmp_path / "run"
    result = cli("generate", "--out", str(out), "--seed", "0", "--seed", "3", "--heads", "transformer_blocks.1:0,2", "--strength", "0.5")
    assert result.returncode == 0, result.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"] == "tiny/sd3" and settings["pipeline"] == "StableDiffusion3Pipeline"
    assert settings["methods"] == [{"method": "softpag", "heads": "transformer_blocks.1:0,2", "strength": 0.5, "scale": 3.0,
                                  "target": "identity", "start": 0.0, "stop": 1.0, "scope": "joint", "batch_branches": True}]
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


# In-process runs of main() below: the same code the console script runs, without an interpreter start-up each.


def run(capsys, *args):
    """(exit status, stdout, stderr lines) of ``mmattn *args`` run in this process."""
    try:
        status = main(quick_model(args))
    except SystemExit as exit:  # argparse: --help, usage errors
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err.strip().splitlines()


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model is loaded: the arguments must be refused before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(hub, "load_pipeline", refuse)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize("args, prog, message", [
    (["generate", "--bogus"], "mmattn generate", "unrecognized arguments: --bogus"),
    (["generate", "--method", "sag"], "mmattn generate", "argument --method: invalid choice: 'sag'"),
    (["heads"], "mmattn heads", "the following arguments are required: ACTION"),
])
def test_usage_errors_are_one_line_and_help_shows_usage(capsys, args, prog, message):
    status, _, err = run(capsys, *args)
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: ") and message in err[0] and err[0].endswith(f"(see {prog} --help)")
    status, out, _ = run(capsys, *prog.split()[1:], "--help")
    assert status == 0 and out.startswith(f"usage: {prog} [-h]")


def test_ctrl_c_exits_130_with_a_short_message(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "load_pipeline", interrupted)
    status, _, err = run(capsys, "generate")
    assert status == 130 and err == ["mmattn generate: interrupted"]


def test_offline_clip_objective_is_one_line(capsys, tmp_path, no_loading):
    status, _, err = run(capsys, "heads", "search", "--objective", "clip:someone/no-clip", "--out", str(tmp_path / "h"))
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith("mmattn heads search: error: model 'someone/no-clip' is not available offline")
    assert "HF_HUB_OFFLINE=1" in err[0]


def test_out_that_cannot_be_written_is_refused_before_loading(capsys, tmp_path, monkeypatch, no_loading):
    file = tmp_path / "file.txt"
    file.write_text("")
    for out in (file, file / "sub"):
        status, _, err = run(capsys, "generate", "--out", str(out))
        assert status == 1 and err == [f"mmattn generate: error: --out={out}: {file} is a file, not a folder"]
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    status, _, err = run(capsys, "heads", "search", "--out", str(tmp_path / "new"))
    assert status == 1 and err == [f"mmattn heads search: error: --out={tmp_path / 'new'}: {tmp_path} is not writable"]


@pytest.mark.slow
def test_a_non_empty_out_needs_overwrite(capsys, tmp_path):
    out = tmp_path / "run"
    quick = ("--steps", "1", "--no-baseline", "--out", str(out))
    assert run(capsys, "generate", "--overwrite", *quick)[0] == 0  # a folder not made yet: make run's first run
    (out / "notes.txt").write_text("mine")
    status, _, err = run(capsys, "generate", *quick)
    assert status == 1 and len(err) == 1 and "is not empty: pass --overwrite" in err[0]
    assert run(capsys, "generate", "--method", "seg", "--overwrite", *quick)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "seg", "settings.json"]  # softpag/ went
    assert json.loads((out / "settings.json").read_text())["methods"][0]["method"] == "seg"


@pytest.mark.slow
def test_a_model_folder_runs_and_is_checked_for_its_kind_before_loading(capsys, tmp_path, monkeypatch):
    build_tiny("tiny/sd3").save_pretrained(tmp_path / "sd3")
    status, _, err = run(capsys, "generate", "--model", str(tmp_path / "sd3"), "--steps", "1", "--no-baseline",
                         "--out", str(tmp_path / "out"))
    settings = json.loads((tmp_path / "out/settings.json").read_text())
    assert status == 0 and settings["pipeline"] == "StableDiffusion3Pipeline"
    # what ran, the pipeline's defaults included: its default size and CFG scale
    assert {"height": 32, "width": 32, "num_inference_steps": 1, "guidance_scale": 7.0}.items() <= settings["call"].items()
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded an image model for video"))
    status, _, err = run(capsys, "video", "--model", str(tmp_path / "sd3"))
    assert status == 1 and err == [f"mmattn video: error: model {str(tmp_path / 'sd3')!r} is of kind 'image'; "
                                   "this needs one of: video"]


def test_a_folder_that_is_not_a_pipeline_is_one_line(capsys, tmp_path):
    status, _, err = run(capsys, "generate", "--model", str(tmp_path), "--out", str(tmp_path / "out"))
    assert status == 1 and err == [f"mmattn generate: error: model {str(tmp_path)!r} is a folder without "
                                   "model_index.json: not a diffusers pipeline"]


@pytest.mark.parametrize("text", ['{"settings": {"prompts": [', "[]"])
def test_a_broken_checkpoint_is_one_line_naming_the_file(capsys, tmp_path, text):
    (tmp_path / "checkpoint.json").write_text(text)
    status, _, err = run(capsys, "heads", "search", "--steps", "1", "--out", str(tmp_path))
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith(f"mmattn heads search: error: checkpoint {tmp_path / 'checkpoint.json'} is not ")


@pytest.mark.parametrize("args, message", [
    (["generate", "--steps", "0"], "argument --steps: 0 is out of range: expected an int >= 1"),
    (["generate", "--height", "0"], "argument --height: 0 is out of range: expected an int >= 1"),
    (["generate", "--width", "-8"], "argument --width: -8 is out of range: expected an int >= 1"),
    (["generate", "--seed", "-1"], "argument --seed: -1 is out of range: expected an int with 0 <= seed < 2**64"),
    (["generate", "--seed", str(2**64)], f"argument --seed: {2**64} is out of range"),
    (["generate", "--seed", "x"], "argument --seed: 'x' is not an int"),
    (["video", "--num-frames", "0"], "argument --num-frames: 0 is out of range: expected an int >= 1"),
    (["heads", "search", "--steps", "0"], "argument --steps: 0 is out of range: expected an int >= 1"),
    (["heads", "search", "--top-k", "0"], "argument --top-k: 0 is out of range: expected an int >= 1"),
    (["generate", "--device", "gpu"], "argument --device: 'gpu' is not a torch device"),
    (["generate", "--method", "pag", "--strength", "0.5"], "--strength applies to --method seg, softpag; not to --method pag"),
    (["generate", "--sigma", "3"], "--sigma applies to --method seg; not to --method softpag"),
    (["generate", "--method", "stg", "--scope", "image"], "--scope applies to --method pag, softpag; not to --method stg"),
    (["video", "--method", "seg", "--rescale", "0.5"], "--rescale applies to --method stg; not to --method seg"),
    (["generate", "--method", "none", "--heads", "transformer_blocks.1"],
     "--heads applies to --method pag, seg, slg, softpag, stg; not to --method none"),
])
def test_invalid_values_and_flags_of_other_methods_are_usage_errors(capsys, no_loading, args, message):
    status, _, err = run(capsys, *args)
    assert status == 2 and len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("args, message", [
    (["generate", "--steps", "1001"], "--steps=1001 is out of range for tiny/sd3: expected an int in [1, 1000]"),
    (["generate", "--height", "30"], "--height=30 does not suit tiny/sd3: expected a multiple of 4"),
    (["generate", "--model", "tiny/sd", "--width", "36"], "--width=36 does not suit tiny/sd: expected a multiple of 8"),
    (["video", "--num-frames", "4"], "--num-frames=4 does not suit tiny/wan: expected 2k+1 frames (1, 3, 5, ...)"),
    (["heads", "search", "--num-frames", "5"], "--num-frames=5 applies to video models; tiny/sd3 makes images"),
    (["heads", "search", "--steps", "1001"], "--steps=1001 is out of range for tiny/sd3"),
])
def test_values_the_model_does_not_take_fail_before_generating(capsys, tmp_path, args, message):
    status, _, err = run(capsys, *args, "--out", str(tmp_path / "out"))
    assert status == 1 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_window_that_covers_no_step_warns(capsys, tmp_path):
    status, _, err = run(capsys, "generate", "--method", "slg", "--start", "0.5", "--stop", "0.6", "--steps", "1",
                         "--no-baseline", "--out", str(tmp_path))
    assert status == 0
    assert ("mmattn generate: warning: slg guides no step: no step i of 1 has start=0.5 <= i/1 < stop=0.6, so its "
            "outputs equal the baseline") in err


@pytest.mark.slow
def test_settings_record_what_ran(capsys, tmp_path):
    status, _, err = run(capsys, "video", "--num-frames", "3", "--height", "16", "--width", "48", "--steps", "1",
                         "--no-baseline", "--out", str(tmp_path))
    assert status == 0 and not any("warning" in line for line in err)
    call = json.loads((tmp_path / "settings.json").read_text())["call"]
    assert {"num_frames": 3, "height": 16, "width": 48, "num_inference_steps": 1}.items() <= call.items()
    from PIL import Image

    gif = Image.open(tmp_path / "stg/prompt00_seed0.webp")
    assert gif.n_frames == 3 and gif.size == (48, 16)


@pytest.mark.slow
def test_heads_search_on_a_video_model(capsys, tmp_path):
    status, out, _ = run(capsys, "heads", "search", "--model", "tiny/wan", "--layers", "blocks.1:0", "--rounds", "1",
                         "--top-k", "1", "--steps", "1", "--out", str(tmp_path))
    assert status == 0 and 'use: mmattn video --model tiny/wan --heads "blocks.1:0"' in out
    saved = json.loads((tmp_path / "heads.json").read_text())
    assert saved["model"] == "tiny/wan" and saved["spec"] == "blocks.1:0" and saved["dtype"] == "float32"


def test_accelerate_is_installed_for_real_checkpoints():
    import accelerate  # noqa: F401
    from diffusers.utils import is_accelerate_available

    assert is_accelerate_available()
    assert re.search(r'^\s*"accelerate[><=~]', (REPO / "pyproject.toml").read_text(), re.MULTILINE)


@pytest.mark.parametrize("cuda, bf16, expected", [(False, False, ("cpu", torch.float32)),
                                                  (True, True, ("cuda", torch.bfloat16)),
                                                  (True, False, ("cuda", torch.float16))])
def test_default_device_and_dtype(monkeypatch, cuda, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
    device, dtype = cli_module._device_and_dtype(argparse.Namespace(device=None, dtype=None))
    assert (str(device), dtype) == expected


@pytest.mark.slow
def test_device_and_dtype_are_applied_and_recorded(capsys, tmp_path, monkeypatch):
    loaded = []
    load = hub.load_pipeline
    monkeypatch.setattr(hub, "load_pipeline", lambda *args, **kwargs: loaded.append(load(*args, **kwargs)) or loaded[-1])
    status, _, err = run(capsys, "generate", "--device", "cpu", "--dtype", "bfloat16", "--steps", "1", "--no-baseline",
                         "--out", str(tmp_path))
    assert status == 0, err
    assert loaded[0].transformer.dtype == torch.bfloat16 and loaded[0].transformer.device.type == "cpu"
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["device"] == "cpu" and settings["dtype"] == "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_one_line(capsys, no_loading):
    status, _, err = run(capsys, "generate", "--device", "cuda")
    assert status == 1 and len(err) == 1 and err[0].startswith("mmattn generate: error: --device=cuda is not available here")


def test_method_flags_come_from_the_registry():
    """Every setting of every registered guidance method is a flag of generate and video, with its choices."""
    from mmattn import cli, methods

    guidance = [name for name in methods.list_methods("diffusion") if "scale" in {f.name for f in methods.settings(name)}]
    assert "softpag" in guidance and "window" not in guidance
    parser = cli._parser()
    for command in ("generate", "video"):
        sub = parser._subparsers._group_actions[0].choices[command]
        actions = {a.dest: a for a in sub._actions}
        assert set(actions["method"].choices) == set(guidance) | {"none"}
        for name in guidance:
            for f in methods.settings(name):
                flag = "heads" if f.name in ("heads", "layers") else f.name
                assert flag in actions, (command, name, f.name)
                assert actions[flag].choices == f.metadata.get("choices")
    assert "strength" not in cli.METHOD_FLAGS["pag"] and cli.METHOD_FLAGS["softpag"] == ("strength", "target", "scope")


def test_eval_vqa_writes_the_table(tmp_path, monkeypatch, capsys):
    from mmattn import cli
    from mmattn.shapes import vlm

    monkeypatch.setattr(vlm, "load", lambda: vlm.build(seed=0))  # the command's wiring, not the scores
    assert cli.main(["eval", "vqa", "--questions", "6", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| FastV | 33% | 48 |" in out and (tmp_path / "vqa.md").exists()
    with pytest.raises(SystemExit) as usage:
        cli.main(["eval", "vqa", "--questions", "2"])
    assert usage.value.code == 2 and "--questions" in capsys.readouterr().err


def test_generate_defaults_to_shapes_t2i(tmp_path):
    result = subprocess.run([MMATTN, "generate", "--steps", "4", "--out", str(tmp_path)], capture_output=True,
                            text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["model"] == "mmattn/shapes-t2i" and settings["prompts"] == ["a red circle left of a blue square"]
    assert settings["call"]["height"] == 64 and (tmp_path / "comparison.png").exists()


@pytest.mark.slow
def test_generate_from_settings_reproduces_bit_for_bit(tmp_path, capsys):
    """`--from settings.json` runs the recorded model, method, prompts, seeds and call again: the same pixels."""
    first = tmp_path / "first"
    status, _, err = run(capsys, "generate", "--model", "tiny/sd3", "--steps", "2", "--seed", "3", "--method", "seg",
                         "--heads", "transformer_blocks.1:*", "--prompt", "a red fox", "--out", str(first))
    assert status == 0, err
    status, _, err = run(capsys, "generate", "--from", str(first / "settings.json"), "--out", str(tmp_path / "again"))
    assert status == 0, err
    from PIL import Image

    settings = json.loads((first / "settings.json").read_text())
    assert json.loads((tmp_path / "again" / "settings.json").read_text())["outputs"] == settings["outputs"]
    for record in settings["outputs"]:
        a = np.asarray(Image.open(first / record["file"]))
        b = np.asarray(Image.open(tmp_path / "again" / record["file"]))
        assert np.array_equal(a, b), record["file"]
    baseline, seg = (np.asarray(Image.open(first / f"{v}/prompt00_seed3.png")) for v in ("baseline", "seg"))
    assert not np.array_equal(baseline, seg)


def test_vqa_answers_without_and_with_a_method(capsys, tmp_path):
    status, out, err = run(capsys, "vqa", "--question", "how many shapes are there", "--method", "fastv", "--layer",
                           "2", "--keep", "0.33")
    lines = out.strip().splitlines()
    assert status == 0, err
    assert lines[0].startswith("baseline: ") and lines[1].startswith("fastv: ")
    assert "fastv kept 48 of 144 image tokens" in lines[2]
    from PIL import Image

    from mmattn.shapes import scenes, vlm

    scenes.render(scenes.scene(7), vlm.IMAGE_SIZE).save(tmp_path / "scene.png")
    status, out, err = run(capsys, "vqa", "--image", str(tmp_path / "scene.png"), "--method", "pyramiddrop",
                           "--stages", "[[1, 0.5], [3, 0.25]]")
    assert status == 0 and "pyramiddrop kept 36 of 144 image tokens" in out, err
    assert Image.open(tmp_path / "scene.png").size == (48, 48)


@pytest.mark.parametrize("args, message", [
    (["--method", "var", "--keep", "3"], "--keep applies to --method divprune, fastv, sparsevlm, visionzip; not to --method var"),
    (["--method", "fastv", "--keep", "2.5"], "keep=2.5 is out of range"),
    (["--image", "/nonexistent.png"], "--image=/nonexistent.png: no such file"),
])
def test_vqa_bad_flags_are_one_line(capsys, args, message, no_loading):
    status, _, err = run(capsys, "vqa", *args)
    assert status in (1, 2) and len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_generate_with_a_window_at_twice_the_resolution_and_from_settings(capsys, tmp_path):
    first = tmp_path / "first"
    status, _, err = run(capsys, "generate", "--model", "tiny/sd3", "--height", "64", "--width", "64", "--steps", "2",
                         "--method", "none", "--window", "3", "--window-steps", "0,1", "--out", str(first))
    assert status == 0, err
    settings = json.loads((first / "settings.json").read_text())
    assert settings["methods"][0]["method"] == "window" and settings["methods"][0]["window"]["kernel_size"] == [3, 3]
    from PIL import Image

    windowed = np.asarray(Image.open(first / "window/prompt00_seed0.png"))
    assert windowed.shape == (64, 64, 3) and not np.array_equal(windowed, np.asarray(Image.open(first / "baseline/prompt00_seed0.png")))
    status, _, err = run(capsys, "generate", "--from", str(first / "settings.json"), "--out", str(tmp_path / "again"))
    assert status == 0, err
    assert np.array_equal(windowed, np.asarray(Image.open(tmp_path / "again/window/prompt00_seed0.png")))
    status, _, err = run(capsys, "video", "--window", "1,3,3", "--freeswim", "--out", str(tmp_path / "v"))
    assert status == 2 and "give one" in err[0]


@pytest.mark.parametrize("args, message", [
    (["video", "--window", "3,3"], "--window=3,3: expected 3 kernel sizes for video (frames, rows, cols)"),
    (["generate", "--window-dilation", "2"], "--window-dilation and --window-steps need --window"),
    (["generate", "--window", "0"], "'0': expected positive ints"),
])
def test_window_flags_are_checked_before_loading(capsys, args, message, no_loading):
    status, _, err = run(capsys, *args)
    assert status == 2 and message in err[0], err


@pytest.mark.slow
def test_methods_file_applies_several_methods_in_one_variant(capsys, tmp_path):
    listed = [{"method": "pag", "heads": "transformer_blocks.1:*", "scale": 2.0},
              {"method": "seg", "heads": "transformer_blocks.2:*"}]
    (tmp_path / "methods.json").write_text(json.dumps(listed))
    out = tmp_path / "out"
    status, _, err = run(capsys, "generate", "--steps", "2", "--methods", str(tmp_path / "methods.json"), "--out", str(out))
    assert status == 0, err
    settings = json.loads((out / "settings.json").read_text())
    assert [m["method"] for m in settings["methods"][0]] == ["pag", "seg"] and (out / "pag+seg").is_dir()
    status, _, err = run(capsys, "generate", "--methods", str(tmp_path / "methods.json"), "--scale", "3")
    assert status == 2 and "--methods sets every method setting; drop --scale" in err[0]


def test_eval_gen_writes_the_table(tmp_path):
    result = cli("eval", "gen", "--images", "2", "--steps", "1", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "| CFG |" in result.stdout and (tmp_path / "gen.md").exists() and (tmp_path / "gen.json").exists()
