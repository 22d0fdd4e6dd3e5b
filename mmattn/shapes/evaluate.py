"""The shapes-world evaluations: ``mmattn eval vqa|gen`` (or ``python -m mmattn.shapes.evaluate vqa|gen``).

vqa: accuracy on test-split questions (overall and per question type) of shapes-vlm unmodified and with each pruning
method keeping 33 %, 22 % and 11 % of the 144 image tokens (the shape of the field's 192/128/64-of-576 table),
and with each sink method (VAR, PAI, ACT, ZeroTuning) at its defaults, with the mean time of a batch's prefill
(one answer token) for each. Writes ``vqa.json``, ``vqa.md`` and, with
matplotlib, ``vqa.png``.

gen: shapes-t2i's prompt adherence (shapes-classifier, :func:`mmattn.shapes.t2i.matches`) and a Fréchet distance
on shapes-classifier's pooled features against renders of the same scenes, for CFG alone and CFG with PAG,
SoftPAG, SEG and SLG, at several CFG scales. Writes ``gen.json``, ``gen.md`` and ``gen.png``.
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
from mmattn import ACT, PAG, PAI, SEG, SLG, VAR, VHR, DivPrune, FastV, PyramidDrop, SoftPAG, SparseVLM, VisionZip, ZeroTuning

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


def sink_methods() -> dict:
    """The sink and steering methods at their default settings (ACT and ZeroTuning need heads: all heads of the
    middle layers of the 4-layer LM)."""
    return {"VAR": VAR(), "PAI": PAI(), "ACT": ACT(heads="layers.1-2:*"), "VHR": VHR(),
            "ZeroTuning": ZeroTuning(heads="layers.1-2:*")}


def run(questions: int = 600, out: Path = Path("bench/results/shapes")) -> dict:
    model = vlm.load()
    rows = [{"method": "none", "keep": 1.0, **vlm.evaluate(model, "test", questions)}]
    for keep in KEEPS:
        for name, config in methods(keep).items():
            with mmattn.apply(model.model, config):
                rows.append({"method": name, "keep": keep, **vlm.evaluate(model, "test", questions)})
    for name, config in sink_methods().items():  # all image tokens kept
        with mmattn.apply(model.model, config):
            rows.append({"method": name, "keep": 1.0, **vlm.evaluate(model, "test", questions)})
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
    base = result["rows"][0]["accuracy"]
    series = {}
    for name in methods(KEEPS[0]):
        rows = [r for r in result["rows"] if r["method"] == name]
        series[name] = ([1.0] + [r["keep"] for r in rows], [base] + [r["accuracy"] for r in rows])
    _line_plot(path, series, "image tokens kept", "accuracy", "shapes-vlm: accuracy vs image tokens kept", "x")


def _line_plot(path: Path, series: dict, xlabel: str, ylabel: str, title: str, percent_axis: str) -> None:
    """One line per name of ``series`` ({name: (xs, ys)}), ``percent_axis`` ("x" or "y") in percent; needs
    matplotlib (the ``eval`` extra), else nothing is drawn."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    getattr(ax, f"{percent_axis}axis").set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize="small")  # beside the axes: never over a line
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


CFG_SCALES = (1.5, 3.0, 5.0)


# What `mmattn heads search --objective adherence` found on shapes-t2i (bench/results/shapes/heads/heads.json:
# 6 validation captions x seeds 0, 1; 2 rounds, top 2; SoftPAG strength 1, scale 1.5).
SEARCHED_HEADS = "transformer_blocks.0:0,2; transformer_blocks.3:2; transformer_blocks.1:3"


def guidance_methods() -> dict:
    """The guidance methods at one setting each, on shapes-t2i's middle blocks (4 blocks: 0-3), and SoftPAG on the
    heads the adherence search found."""
    return {"PAG": PAG(heads="transformer_blocks.2:*", scale=1.5),
            "SoftPAG (searched heads)": SoftPAG(heads=SEARCHED_HEADS, scale=1.5),
            "SoftPAG": SoftPAG(heads="transformer_blocks.1:*;transformer_blocks.2:*", strength=0.5, scale=1.5),
            "SEG": SEG(heads="transformer_blocks.2:*", scale=1.5),
            "SLG": SLG(layers="transformer_blocks.2", scale=1.5, start=0.0, stop=1.0)}


@torch.no_grad()
def features(judge, images) -> torch.Tensor:
    """shapes-classifier's pooled layer -2 features (B, width): what the Fréchet distance compares."""
    from .classifier import pixels

    hidden = judge.tower(pixel_values=pixels(images), output_hidden_states=True).hidden_states[-2][:, 1:]
    return hidden.mean(1).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), feature rows (N, d), in float64."""
    def sqrt_psd(m):
        values, vectors = torch.linalg.eigh((m + m.T) / 2)
        return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    root = sqrt_psd(s_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a + s_b - 2 * sqrt_psd(root @ s_b @ root)))


def run_gen(images: int = 100, steps: int | None = None, out: Path = Path("bench/results/shapes")) -> dict:
    from . import classifier, t2i

    pipe, judge = t2i.load(), classifier.load()
    items = t2i.prompts("test", images)
    real = features(judge, [scenes.render(s, t2i.IMAGE_SIZE) for s in items])
    call = {} if steps is None else {"num_inference_steps": steps}
    rows = []
    for w in CFG_SCALES:
        for name, config in [("CFG", None), *guidance_methods().items()]:
            with mmattn.apply(pipe, [] if config is None else config):
                generated = t2i.generate(pipe, items, guidance_scale=w, **call)
            found = classifier.describe(judge, generated)
            adherence = sum(t2i.matches(s, f) for s, f in zip(items, found)) / len(items)
            rows.append({"method": name, "guidance_scale": w, "adherence": adherence,
                         "frechet": frechet_distance(features(judge, generated), real),
                         "settings": None if config is None else config.to_dict()})
            print(json.dumps({k: rows[-1][k] for k in ("method", "guidance_scale", "adherence", "frechet")}))
    result = {"date": date.today().isoformat(), "machine": platform.platform(), "threads": torch.get_num_threads(),
              "commit": _commit(), "images": images, "steps": steps or t2i.CALL_DEFAULTS["num_inference_steps"],
              "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gen.json").write_text(json.dumps(result, indent=2))
    (out / "gen.md").write_text(gen_markdown(result))
    _plot_gen(result, out / "gen.png")
    return result


def gen_markdown(result: dict) -> str:
    lines = [f"shapes-t2i, {result['images']} test prompts, {result['steps']} steps ({result['date']}, "
             f"{result['machine']}, commit {result['commit']}); adherence by shapes-classifier (higher is better), "
             "Fréchet distance on its features against renders of the same scenes (lower is better)", "",
             "| method | " + " | ".join(f"CFG {w}: adherence / FD" for w in CFG_SCALES) + " |",
             "|---|" + "---|" * len(CFG_SCALES)]
    for name in dict.fromkeys(r["method"] for r in result["rows"]):
        cells = [next(r for r in result["rows"] if r["method"] == name and r["guidance_scale"] == w) for w in CFG_SCALES]
        lines.append(f"| {name} | " + " | ".join(f"{c['adherence']:.0%} / {c['frechet']:.2f}" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_gen(result: dict, path: Path) -> None:
    series = {}
    for name in dict.fromkeys(r["method"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["method"] == name]
        series[name] = ([r["guidance_scale"] for r in rows], [r["adherence"] for r in rows])
    _line_plot(path, series, "CFG scale", "prompt adherence (shapes-classifier)",
               "shapes-t2i: adherence vs guidance scale", "y")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmattn.shapes.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("vqa", "gen"))
    parser.add_argument("--questions", type=int, default=600, help="vqa: test-split questions")
    parser.add_argument("--images", type=int, default=100, help="gen: test-split prompts, one image each per setting")
    parser.add_argument("--steps", type=int, default=None, help="gen: denoising steps (default: shapes-t2i's)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/shapes"))
    args = parser.parse_args(argv)
    if args.task == "vqa":
        print(markdown(run(args.questions, args.out)))
    else:
        print(gen_markdown(run_gen(args.images, args.steps, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
