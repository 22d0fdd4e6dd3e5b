"""The scripted runs (demos/): a run split across 2 CPU processes (torchrun) writes the same files as 1 process."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

DEMOS = Path(__file__).parents[1] / "demos"


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def launch(script: str, processes: int, *args) -> subprocess.CompletedProcess:
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 \
        else [sys.executable]
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    return subprocess.run([*runner, str(DEMOS / script), *args], capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.mark.slow
def test_generate_images_on_two_processes_writes_what_one_process_writes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na large yellow star\n")
    common = ["--prompts", str(prompts), "--model", "tiny/sd3", "--method", "softpag",
              "--set", "heads=transformer_blocks.1:0", "--set", "scale=2", "--seed", "1", "--steps", "2"]
    one = launch("generate_images.py", 1, *common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    two = launch("generate_images.py", 2, *common, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    written = files(tmp_path / "one")
    assert written == files(tmp_path / "two")
    assert {"contact_sheet.png", "summary.json", "baseline/prompt02_seed1.png", "softpag/prompt02_seed1.png.json"} <= set(written)
    assert "2 process(es)" in two.stdout


@pytest.mark.slow
def test_vqa_eval_on_two_processes_gives_the_same_table(tmp_path):
    common = ["--questions", "12", "--method", "fastv", "--set", "layer=2", "--set", "keep=0.33"]
    tables = []
    for processes in (1, 2):
        result = launch("vqa_eval.py", processes, *common, "--out", str(tmp_path / str(processes)))
        assert result.returncode == 0, result.stderr[-2000:]
        rows = (tmp_path / str(processes) / "table.md").read_text().splitlines()
        tables.append([row.rsplit("|", 2)[0] for row in rows])  # without the seconds column
    assert tables[0] == tables[1] and tables[0][2].startswith("| 12 |")
