"""The ``mmattn`` command line: scripted generation with an intervention, and the tools around it.

    mmattn generate                                   # tiny/sd3 + SoftPAG, outputs under outputs/generate
    mmattn generate --model tiny/sd3 --heads "transformer_blocks.1:0,2" --strength 0.5 --scale 3 \\
        --prompt "a red fox" --seed 0 --seed 1 --out outputs/fox
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__

DEFAULT_MODEL = "tiny/sd3"
DEFAULT_VIDEO_MODEL = "tiny/wan"
PENDING = {
    "vqa": "VQA with token pruning and sink steering lands with the VLM issues",
    "demo": "the Gradio demo lands with the demo issue",
    "bench": "benchmarks are scripts in the source tree: python bench/bench_kernels.py, bench/bench_perturbation.py",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmattn", description="Training-free attention interventions for diffusion models and VLMs.")
    parser.add_argument("--version", action="version", version=f"mmattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate images with an attention intervention; writes images + settings.json")
    _generation_args(gen, DEFAULT_MODEL, "softpag", "outputs/generate")
    gen.set_defaults(run=_generate, kind="image")
    video = sub.add_parser("video", help="generate videos (Wan) with an intervention; writes GIFs + settings.json")
    _generation_args(video, DEFAULT_VIDEO_MODEL, "stg", "outputs/video")
    video.add_argument("--num-frames", type=int, help="frames (Wan: 4k+1; default: the model's)")
    video.set_defaults(run=_generate, kind="video")

    heads = sub.add_parser("heads", help="attention heads: HeadHunter search for SoftPAG")
    heads_sub = heads.add_subparsers(dest="heads_command", metavar="ACTION", required=True)
    search = heads_sub.add_parser("search", help="greedy HeadHunter search; writes heads.json with a SoftPAG head spec")
    search.add_argument("--model", default=DEFAULT_MODEL, help=f"model id, local folder or tiny/<name> (default {DEFAULT_MODEL})")
    search.add_argument("--objective", default="sharpness", help="sharpness | colorfulness | clip:<CLIP model id>")
    search.add_argument("--prompt", action="append", help="prompt (repeat; default: two built-in prompts)")
    search.add_argument("--seed", action="append", type=int, help="seed (repeat; default 0)")
    search.add_argument("--rounds", type=int, default=1, help="greedy rounds R (default 1)")
    search.add_argument("--top-k", type=int, default=2, help="heads kept per round k (default 2)")
    search.add_argument("--layers", help="restrict candidates to a head spec (default: every self-attention head)")
    search.add_argument("--strength", type=float, default=1.0, help="SoftPAG blend u used while searching")
    search.add_argument("--scale", type=float, default=3.0, help="perturbation guidance scale s")
    search.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    search.add_argument("--out", default="outputs/heads", help="output folder: heads.json and checkpoint.json")
    search.set_defaults(run=_heads_search)

    for name, message in PENDING.items():
        pending = sub.add_parser(name, help=f"(not yet available) {message}")
        pending.set_defaults(run=lambda args, message=message, name=name: _pending(name, message))
    return parser


def _generation_args(parser, default_model: str, default_method: str, default_out: str) -> None:
    parser.add_argument("--model", default=default_model, help=f"model id, local folder or tiny/<name> (default {default_model})")
    parser.add_argument("--prompt", action="append", help="prompt (repeat for several; default: one built-in prompt)")
    parser.add_argument("--seed", action="append", type=int, help="seed (repeat for several; default 0)")
    parser.add_argument("--method", choices=("softpag", "pag", "seg", "slg", "stg", "none"), default=default_method,
                        help=f"intervention (default {default_method})")
    parser.add_argument("--heads", help="head or layer selection, e.g. 'transformer_blocks.1:0,2' (default: the middle block)")
    parser.add_argument("--strength", type=float, default=1.0, help="softpag: blend u in [0, 1] (1 = PAG)")
    parser.add_argument("--target", choices=("identity", "uniform"), default="identity", help="softpag: target map")
    parser.add_argument("--scope", choices=("joint", "image"), default="joint", help="softpag/pag: 'image' = SD3 image block only")
    parser.add_argument("--sigma", type=float, default=10.0, help="seg: query blur width in tokens (inf: mean query)")
    parser.add_argument("--mode", choices=("attention", "residual"), default="attention", help="stg: what is skipped")
    parser.add_argument("--rescale", type=float, default=0.0, help="stg: rescale r in [0, 1]")
    parser.add_argument("--scale", type=float, help="perturbation guidance scale s (default: the method's)")
    parser.add_argument("--start", type=float, help="first fraction of steps with guidance (default: the method's)")
    parser.add_argument("--stop", type=float, help="fraction of steps where guidance stops (default: the method's)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale w")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline and the side-by-side comparison")
    parser.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")


def _pending(name: str, message: str) -> int:
    print(f"mmattn {name}: not available in this version: {message}", file=sys.stderr)
    return 2


def _default_heads(pipe) -> str:
    from .adapters import diffusion_family

    layers = list(diffusion_family(pipe).attention_layers(diffusion_family(pipe).denoiser(pipe)))
    return f"{layers[len(layers) // 2]}:*"


def _method(args, pipe):
    """The method config the generate arguments describe (None for --method none)."""
    from . import PAG, SEG, SLG, STG, SoftPAG

    if args.method == "none":
        return None
    spec = args.heads or _default_heads(pipe)
    common = {k: v for k, v in (("scale", args.scale), ("start", args.start), ("stop", args.stop)) if v is not None}
    if args.method == "softpag":
        return SoftPAG(heads=spec, strength=args.strength, target=args.target, scope=args.scope, **common)
    if args.method == "pag":
        return PAG(heads=spec, scope=args.scope, **common)
    if args.method == "seg":
        return SEG(heads=spec, sigma=args.sigma, **common)
    if args.method == "slg":
        return SLG(layers=spec, **common)
    return STG(layers=spec, mode=args.mode, rescale=args.rescale, **common)


def _grid(rows: list[list], labels: list[str]):
    """Side-by-side picture: one column per label, one row per (prompt, seed)."""
    from PIL import Image, ImageDraw

    zoom = max(1, 128 // rows[0][0].width)  # tiny models make tiny images: enlarge them to be seen
    rows = [[image.resize((image.width * zoom, image.height * zoom), Image.NEAREST) for image in row] for row in rows]
    w, h = rows[0][0].size
    pad = 14
    grid = Image.new("RGB", (w * len(labels), pad + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(labels):
        draw.text((c * w + 2, 1), label, fill="black")
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            grid.paste(image, (c * w, pad + r * h))
    return grid


def _generate(args) -> int:
    """Images (``generate``) or videos (``video``): baseline and intervention per prompt and seed."""
    import torch
    from tqdm.auto import tqdm

    from . import apply
    from .hub import load_pipeline, pipeline_defaults

    video = args.kind == "video"
    pipe = load_pipeline(args.model, kinds=(args.kind,))
    pipe.set_progress_bar_config(leave=False)
    call = pipeline_defaults(args.model) | {"output_type": "pil"}
    for key, value in (("num_inference_steps", args.steps), ("height", args.height), ("width", args.width),
                       ("guidance_scale", args.guidance_scale), ("num_frames", getattr(args, "num_frames", None))):
        if value is not None:
            call[key] = value
    method = _method(args, pipe)
    prompts = args.prompt or ["a photograph of a lighthouse on a cliff at sunset"]
    seeds = args.seed or [0]
    out = Path(args.out)
    variants = ([("baseline", None)] if not args.no_baseline else []) + [(args.method, method)]

    rows, records = [], []
    jobs = [(p, s) for p in range(len(prompts)) for s in seeds]
    started = time.perf_counter()
    for p, seed in tqdm(jobs, desc=args.command, unit="video" if video else "image"):
        row = []
        for label, config in variants:
            generator = torch.Generator("cpu").manual_seed(seed)
            if config is None:
                output = pipe(prompts[p], generator=generator, **call)
            else:
                with apply(pipe, config):
                    output = pipe(prompts[p], generator=generator, **call)
            frames = output.frames[0] if video else [output.images[0]]
            path = out / label / f"prompt{p:02d}_seed{seed}.{'gif' if video else 'png'}"
            path.parent.mkdir(parents=True, exist_ok=True)
            _save(frames, path)
            records.append({"variant": label, "prompt_index": p, "seed": seed, "file": str(path.relative_to(out))})
            row.append(frames)
        rows.append(row)
    written = f"{len(records)} {'videos' if video else 'images'}, settings.json"
    if len(variants) > 1:
        comparison = out / f"comparison.{'gif' if video else 'png'}"
        labels = [label for label, _ in variants]
        _save([_grid([[frames[t] for frames in row] for row in rows], labels) for t in range(len(rows[0][0]))], comparison)
        written += f" and {comparison.name}"
    settings = {
        "mmattn_version": __version__,
        "model": args.model,
        "pipeline": type(pipe).__name__,
        "method": method.to_dict() if method else None,
        "prompts": prompts,
        "seeds": seeds,
        "call": call,
        "outputs": records,
        "seconds": round(time.perf_counter() - started, 3),
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    print(f"wrote {written} to {out}")
    return 0


def _save(frames: list, path: Path) -> None:
    """One frame as PNG, several as a looping GIF (8 frames per second)."""
    if len(frames) == 1:
        frames[0].save(path)
    else:
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0)


def _heads_search(args) -> int:
    from .hub import load_pipeline, pipeline_defaults
    from .pipelines.head_search import CLIPScore, HeadSearch

    objective = CLIPScore.from_pretrained(args.objective[5:]) if args.objective.startswith("clip:") else args.objective
    pipe = load_pipeline(args.model, kinds=("image",))
    call = pipeline_defaults(args.model) | ({"num_inference_steps": args.steps} if args.steps else {})
    out = Path(args.out)
    search = HeadSearch(pipe, objective, args.prompt or ["a photograph of a red fox in snow", "a watercolor of a harbour"],
                        seeds=args.seed or [0], rounds=args.rounds, top_k=args.top_k, strength=args.strength,
                        scale=args.scale, layers=args.layers, call_kwargs=call, checkpoint=out / "checkpoint.json")
    result = search.run()
    (out / "heads.json").write_text(json.dumps({"model": args.model, **result.to_json()}, indent=2))
    print(f"heads: {result.spec}")
    print(f"wrote {out / 'heads.json'}; use: mmattn generate --model {args.model} --heads \"{result.spec}\"")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    from ._compat import quiet_upstream_logging

    quiet_upstream_logging()
    from .hub import ModelNotAvailableError

    try:
        return args.run(args)
    except (ModelNotAvailableError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"mmattn {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
