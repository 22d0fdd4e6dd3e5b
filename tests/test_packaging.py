"""The package installs as mmattn.* only: no top-level kernels/processors/pipelines from this project."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from importlib.machinery import PathFinder
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAPPED = ("kernels", "processors", "pipelines")


def test_mapped_subpackages_import():
    import mmattn.kernels
    import mmattn.pipelines
    import mmattn.processors

    for module, folder in ((mmattn.kernels, "kernels"), (mmattn.processors, "processors"), (mmattn.pipelines, "pipelines")):
        assert Path(module.__file__).parent.name == folder


def test_no_top_level_modules_from_this_project(tmp_path):
    # A fresh interpreter outside the repository sees mmattn.kernels but no project-level `kernels`.
    code = (
        "import importlib.util, json, mmattn.kernels\n"
        f"specs = {{n: importlib.util.find_spec(n) for n in {MAPPED!r}}}\n"
        "print(json.dumps({n: (s.origin or str(list(s.submodule_search_locations))) if s else None for n, s in specs.items()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    import json

    for name, origin in json.loads(out).items():
        # (an environment may live inside the repository, as .envs/ does: only the project's own folders count)
        inside = origin is not None and str(REPO / name) in origin
        assert not inside, f"top-level {name!r} resolves into this project: {origin}"


def test_kernels_run_from_the_repository_root_hands_the_name_over(tmp_path):
    """Python run from the repository root finds kernels/ as a top-level `kernels`, a name Hugging Face's package
    owns (transformers >= 5.25 imports it): the folder hands the import over to the installed package of that
    name, or, where there is none, to an empty module without __file__ (transformers' test for "absent")."""
    theirs = tmp_path / "kernels"
    theirs.mkdir()
    (theirs / "__init__.py").write_text("MARK = 'theirs'\n")
    code = "import kernels; print(getattr(kernels, 'MARK', None), getattr(kernels, '__file__', None))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**env, "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["theirs", str(theirs / "__init__.py")]

    installed = PathFinder.find_spec("kernels", [p for p in sys.path if Path(p or ".").resolve() != REPO])
    installed = installed and installed.origin
    code = "import transformers.modeling_utils, mmattn.kernels, kernels; print(getattr(kernels, '__file__', None))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(installed), out.stderr


@pytest.mark.slow
def test_wheel_contains_only_mmattn(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mmattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"mmattn", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for sub in MAPPED:
        assert f"mmattn/{sub}/__init__.py" in names


def test_timm_imports():
    assert importlib.util.find_spec("timm") is not None
    import timm

    assert timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32) is not None
