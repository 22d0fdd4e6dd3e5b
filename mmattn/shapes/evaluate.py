"""What each pruning method costs shapes-vlm in accuracy: ``mmattn eval vqa`` (or ``python -m mmattn.shapes.evaluate vqa``).

Accuracy on test-split questions (overall and per question type) of the unmodified model and of each pruning
method keeping 33 %, 22 % and 11 % of the 144 image tokens (the shape of the field's 192/128/64-of-576 table),
with the mean time of a batch's prefill (one answer token) for each. Writes ``vqa.json``, ``vqa.md`` and, with matplotlib, ``vqa.png``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
from datetime import date
from pathlib import Path

import torch

import mmattn
from mmattn import DivPrune, FastV, PyramidDrop, SparseVLM, VisionZip

from . import scenes, vlm

KEEPS = (0.33, 0.22, 0.11)


def methods(keep: float) -> dict:
    """The pruning methods at one keep ratio, at their usual layers for a 4-layer LM."""
    return {
        "FastV": FastV(layer=2, keep=keep),
        "PyramidDrop": PyramidDrop(stages=[(1, min(1.0, 2 * keep)), (2, keep)]),
        "SparseVLM": SparseVLM(layer=2, keep=keep),
        "DivPrune": DivPrune(keep=keep),
        "VisionZip": VisionZip(keep=keep, contextual=max(1, round(keep * vlm.IMAGE_TOKENS / 8))),
    }


def run(questions: int = 600, out: Path = Path("bench/results/shapes")) -> dict:
    model = vlm.load()
    rows = [{"method": "none", "keep": 1.0, **vlm.evaluate(model, "test", questions)}]
    for keep in KEEPS:
        for name, config in methods(keep).items():
            with mmattn.apply(model.model, config):
                rows.append({"method": name, "keep": keep, **vlm.evaluate(model, "test", questions)})
    result = {"date": date.today().isoformat(), "machine": platform.platform(), "threads": torch.get_num_threads(),
              "commit": _commit(), "questions": rows[0]["questions"], "image_tokens": vlm.IMAGE_TOKENS, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "vqa.json").write_text(json.dumps(result, indent=2))
    (out / "vqa.md").write_text(markdown(result))
    _plot(result, out / "vqa.png")
    return result


def markdown(result: dict) -> str:
    kinds = scenes.QUESTION_TYPES
    lines = [f"shapes-vlm, {result['questions']} test questions, {result['image_tokens']} image tokens "
             f"({result['date']}, {result['machine']}, commit {result['commit']})", "",
             "| method | keep | tokens | accuracy | " + " | ".join(kinds) + " | prefill of a batch |",
             "|---|---|---|---|" + "---|" * len(kinds) + "---|"]
    for row in result["rows"]:
        tokens = round(row["keep"] * result["image_tokens"])
        lines.append(f"| {row['method']} | {row['keep']:.0%} | {tokens} | {row['accuracy']:.1%} | "
                     + " | ".join(f"{row['per_type'][k]:.0%}" for k in kinds)
                     + f" | {row['batch_seconds'] * 1000:.0f} ms ({row['batch_size']} questions) |")
    return "\n".join(lines) + "\n"


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    base = result["rows"][0]["accuracy"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in methods(KEEPS[0]):
        rows = [r for r in result["rows"] if r["method"] == name]
        ax.plot([1.0] + [r["keep"] for r in rows], [base] + [r["accuracy"] for r in rows], marker="o", label=name)
    ax.set_xlabel("image tokens kept")
    ax.set_ylabel("accuracy")
    ax.set_title("shapes-vlm: accuracy vs image tokens kept")
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmattn.shapes.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("vqa",))
    parser.add_argument("--questions", type=int, default=600)
    parser.add_argument("--out", type=Path, default=Path("bench/results/shapes"))
    args = parser.parse_args(argv)
    print(markdown(run(args.questions, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
