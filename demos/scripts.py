"""Scripted runs over many prompts or questions, on one process or split across several (data parallel).

    python demos/generate_images.py --prompts prompts.txt --method softpag --set heads=transformer_blocks.2:* --out out
    torchrun --nproc_per_node 2 demos/generate_images.py ...        # or: accelerate launch --num_processes 2 ...

Processes come from accelerate's ``PartialState`` (torchrun / accelerate launch set its environment; a plain
``python`` run is one process). Each process runs a contiguous share of the prompts (or rows) and writes its own
files; the main process then writes the contact sheet and the summary. Files are named by global index, so a
run on N processes writes the same files as a run on one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mmattn import methods as registry


def method_from(name: str | None, settings: list[str]):
    """The config of ``--method name --set key=value ...`` (values parsed as JSON where they parse, else text)."""
    if name in (None, "none"):
        if settings:
            raise SystemExit(f"--set {settings[0]} needs a --method")
        return None
    values = {}
    for item in settings:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key=value")
        try:
            values[key] = json.loads(text)
        except ValueError:
            values[key] = text
    return registry.from_dict({"method": name, **values})


def process_state():
    from accelerate import PartialState

    return PartialState(cpu=True)


def contact_sheet(out: Path, records: list[dict], labels: list[str], path: Path) -> None:
    """One row per (prompt, seed), one column per variant (a video's first frame)."""
    from PIL import Image

    from mmattn.pipelines.generation import comparison_grid

    rows = {}
    for record in records:
        rows.setdefault((record["prompt_index"], record["seed"]), {})[record["variant"]] = record["file"]
    grid = [[Image.open(out / files[label]).convert("RGB") for label in labels] for _, files in sorted(rows.items())]
    comparison_grid(grid, labels).save(path)


def generate_main(argv=None, video: bool = False) -> int:
    from mmattn.pipelines.generation import GenerationPipeline

    kind = "video" if video else "image"
    parser = argparse.ArgumentParser(description=f"{kind}s for every prompt of a file, baseline and method side by "
                                     "side, on one or several processes")
    parser.add_argument("--prompts", type=Path, required=True, help="a text file: one prompt per line")
    parser.add_argument("--model", default="tiny/wan" if video else "mmattn/shapes-t2i")
    parser.add_argument("--method", default=None, help="a registered diffusion method (default: baseline only)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting of --method")
    parser.add_argument("--seed", action="append", type=int, help="seed (repeat; default 0)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    prompts = [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"--prompts {args.prompts}: no prompt in the file")
    method = method_from(args.method, args.set)
    state = process_state()
    gen = GenerationPipeline.from_pretrained(args.model, [method] if method else [], kinds=(kind,),
                                             compare=not args.no_baseline)
    if args.steps is not None:
        gen.call["num_inference_steps"] = args.steps
    indices = list(range(len(prompts)))
    started = time.perf_counter()
    with state.split_between_processes(indices) as mine:
        if mine:
            gen.generate([prompts[i] for i in mine], seeds=args.seed or [0], out=args.out, first_index=mine[0],
                         progress=state.is_main_process, summary=False)
    state.wait_for_everyone()
    if state.is_main_process:
        records = []
        for sidecar in sorted(args.out.glob("*/prompt*_seed*.json")):
            entry = json.loads(sidecar.read_text())
            records.append({"variant": sidecar.parent.name, "prompt_index": entry["prompt_index"],
                            "seed": entry["seed"], "file": str(sidecar.relative_to(args.out))[: -len(".json")]})
        labels = [label for label, _ in gen.variants()]
        contact_sheet(args.out, records, labels, args.out / "contact_sheet.png")
        summary = {"model": args.model, "methods": [m.to_dict() for m in gen.methods], "prompts": prompts,
                   "seeds": args.seed or [0], "call": gen.call, "outputs": sorted(records, key=lambda r: r["file"])}
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"wrote {len(records)} {kind}s, contact_sheet.png and summary.json to {args.out} "
              f"({state.num_processes} process(es), {time.perf_counter() - started:.1f} s)")
    return 0


def vqa_main(argv=None) -> int:
    """Accuracy and timing of a VLM with a method over a JSONL of {"image": file, "question", "answer"} rows (or
    shapes-world test questions), split across processes; the main process writes the table."""
    from PIL import Image

    from mmattn.pipelines.vqa import VQAPipeline

    parser = argparse.ArgumentParser(description="VQA accuracy and timing with a method, on one or several processes")
    parser.add_argument("--rows", type=Path, default=None,
                        help="JSONL rows {image, question, answer}; image paths relative to the file "
                             "(default: shapes-world test questions)")
    parser.add_argument("--questions", type=int, default=60, help="shapes-world questions without --rows")
    parser.add_argument("--model", default="mmattn/shapes-vlm")
    parser.add_argument("--method", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.rows is not None:
        rows = [json.loads(line) for line in args.rows.read_text().splitlines() if line.strip()]
        for row in rows:
            row["image"] = str(args.rows.parent / row["image"])
    else:
        from mmattn.shapes import scenes

        rows = [{"scene": seed, "question": qa.question, "answer": qa.answer, "kind": qa.kind}
                for seed in scenes.split_seeds("test", max(1, args.questions // 6))
                for qa in scenes.questions(scenes.scene(seed))][: args.questions]
    method = method_from(args.method, args.set)
    state = process_state()
    vqa = VQAPipeline.from_pretrained(args.model, [method] if method else [], max_new_tokens=4)
    results = []
    with state.split_between_processes(list(range(len(rows)))) as mine:
        for start in range(0, len(mine), args.batch_size):
            chunk = [rows[i] for i in mine[start:start + args.batch_size]]
            images = [Image.open(r["image"]).convert("RGB") if "image" in r else _scene_image(r["scene"]) for r in chunk]
            began = time.perf_counter()
            answers = vqa.answer_batch([(image, r["question"]) for image, r in zip(images, chunk)])
            seconds = (time.perf_counter() - began) / len(chunk)
            for index, row, result in zip(mine[start:start + args.batch_size], chunk, answers):
                results.append({"index": index, "question": row["question"], "answer": result.answer,
                                "expected": row["answer"], "kind": row.get("kind", "all"),
                                "right": result.answer.split()[:1] == row["answer"].split()[:1], "seconds": seconds})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"answers-{state.process_index}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    state.wait_for_everyone()
    if state.is_main_process:
        everything = sorted((json.loads(line) for part in sorted(args.out.glob("answers-*.jsonl"))
                             for line in part.read_text().splitlines()), key=lambda r: r["index"])
        kinds = sorted({r["kind"] for r in everything})
        lines = ["| questions | accuracy | " + " | ".join(kinds) + " | s/question |",
                 "|---|---|" + "---|" * len(kinds) + "---|"]
        share = {k: [r["right"] for r in everything if r["kind"] == k] for k in kinds}
        lines.append(f"| {len(everything)} | {sum(r['right'] for r in everything) / len(everything):.1%} | "
                     + " | ".join(f"{sum(v) / len(v):.1%}" for v in share.values())
                     + f" | {sum(r['seconds'] for r in everything) / len(everything):.4f} |")
        (args.out / "table.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    return 0


def _scene_image(seed: int):
    from mmattn.shapes import scenes, vlm

    return scenes.render(scenes.scene(seed), vlm.IMAGE_SIZE)
