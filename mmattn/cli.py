"""The ``mmattn`` command line: scripted generation with an intervention, and the tools around it.

    mmattn generate                                   # tiny/sd3 + SoftPAG, outputs under outputs/generate
    mmattn generate --model tiny/sd3 --heads "transformer_blocks.1:0,2" --strength 0.5 --scale 3 \\
        --prompt "a red fox" --seed 0 --seed 1 --out outputs/fox

Every setting is checked before any work. Exit status: 0 done; 1 an error (one line); 2 a usage error
(one line, as argparse's); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
from pathlib import Path

import torch

from . import SoftPAG, __version__, methods
from .pipelines.head_search import OBJECTIVES

DEFAULT_MODEL = "mmattn/shapes-t2i"  # shipped, trained, offline
DEFAULT_VIDEO_MODEL = "tiny/wan"
BENCHMARKS = ("kernels", "perturbation", "pruning", "sinks", "windows")  # bench/bench_<name>.py in the source tree
# The example each subcommand's --help ends with.
EXAMPLES = {
    "generate": 'mmattn generate --model tiny/sd3 --method softpag --heads "transformer_blocks.1:0,2" --strength 0.5',
    "video": "mmattn video --model tiny/wan --method stg --mode residual --heads blocks.1",
    "heads": 'mmattn heads search --model tiny/sd3 --objective sharpness --rounds 2 --top-k 2 --out outputs/heads',
    "heads search": 'mmattn heads search --model tiny/sd3 --objective sharpness --rounds 2 --top-k 2 --out outputs/heads',
    "eval": "mmattn eval vqa --questions 120 --out outputs/eval",
    "eval vqa": "mmattn eval vqa --questions 120 --out outputs/eval",
    "vqa": "mmattn vqa --question 'what color is the circle' --method fastv --layer 2 --keep 0.33",
    "eval gen": "mmattn eval gen --images 20 --steps 10 --out outputs/eval",
    "demo": "mmattn demo --port 7860",
    "bench": "mmattn bench perturbation --out bench/results/perturbation_cpu.json",
}
# The guidance methods and their flags come from the method registry: each flag sets the config field of its name.
METHODS = {name: methods.get(name) for name in methods.list_methods("diffusion")
           if "scale" in {f.name for f in methods.settings(name)}}
SELECTION_FIELDS = ("heads", "layers")  # set by --heads
GUIDANCE_FLAGS = ("scale", "start", "stop", "batch_branches")  # fields every guidance method has
COMMON_FLAGS = ("heads", *GUIDANCE_FLAGS)
METHOD_FLAGS = {name: tuple(f.name for f in methods.settings(name) if f.name not in SELECTION_FIELDS + GUIDANCE_FLAGS)
                for name in METHODS}
DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_VQA_MODEL = "mmattn/shapes-vlm"
VLM_METHODS = tuple(methods.list_methods("vlm"))
# setting -> the VLM methods that have it
VLM_FLAGS = {flag: [name for name in VLM_METHODS if flag in {f.name for f in methods.settings(name)}]
             for flag in dict.fromkeys(f.name for name in VLM_METHODS for f in methods.settings(name))}
# The pipeline call argument each flag sets.
CALL_FLAGS = {"num_inference_steps": "steps", "height": "height", "width": "width", "num_frames": "num_frames",
              "guidance_scale": "guidance_scale"}
# Multiples of height and width that pipelines check themselves (their check_inputs), beside the latent patch grid.
PIPELINE_SIZE_MULTIPLE = {"unet": 8, "pixart": 8, "wan": 16}
# What generate and video write into --out, and so what --overwrite deletes there.
GENERATED_FILES = ("settings.json", "comparison.png", "comparison.webp")
SEARCH_FILES = ("checkpoint.json", "heads.json")


class UsageError(Exception):
    """A command line that cannot run on any model: reported as argparse's errors are, exit status 2."""


def _usage_line(prog: str, message) -> str:
    return f"{prog}: error: {message} (see {prog} --help)"


class _Parser(argparse.ArgumentParser):
    """An argparse parser that reports a usage error in one line; ``--help`` still prints the usage."""

    def error(self, message: str):
        self.exit(2, _usage_line(self.prog, message) + "\n")


def _int_type(lowest: int, below: int | None = None, expected: str | None = None):
    """argparse type: an int >= ``lowest`` (and < ``below``); ``expected`` describes the range in errors."""
    expected = expected or f"an int >= {lowest}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int: expected {expected}") from None
        if value < lowest or (below is not None and value >= below):
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected {expected}")
        return value

    return parse


_seed = _int_type(0, 2**64, "an int with 0 <= seed < 2**64")


def _device(text: str) -> str:
    try:
        return str(torch.device(text))
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device: expected e.g. cpu, cuda, cuda:1") from None


def _kernel(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ints separated by commas, e.g. 9 or 3,9,9") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive ints")
    return values


def _fractions(text: str) -> tuple[float, float]:
    try:
        start, stop = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected START,STOP, e.g. 0.2,1") from None
    return start, stop


def _listed_methods(args) -> list:
    """The methods of --methods FILE (checked before the model loads); with it, --method and its flags are not
    read, so giving them is an error."""
    if args.methods is None:
        return []
    given = [flag for flag in COMMON_FLAGS + sum(METHOD_FLAGS.values(), ()) if getattr(args, flag, None) is not None]
    if given:
        raise UsageError(f"--methods sets every method setting; drop --{given[0].replace('_', '-')}")
    if not args.methods.is_file():
        raise ValueError(f"--methods={args.methods}: no such file")
    text = args.methods.read_text()
    if args.methods.suffix in (".yaml", ".yml"):
        import yaml

        entries = yaml.safe_load(text)
    else:
        try:
            entries = json.loads(text)
        except ValueError as error:
            raise ValueError(f"--methods={args.methods}: not JSON ({error})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"--methods={args.methods}: expected a non-empty list of method settings")
    listed = [methods.from_dict(entry) for entry in entries]
    for config in listed:
        if config.applies_to != "diffusion":
            raise ValueError(f"--methods: {config.name} applies to VLMs, not to generation")
    args.method = "none"  # the listed methods replace --method
    return listed


def _windows(args) -> list:
    """The window methods --window / --freeswim ask for (checked before the model loads)."""
    from .windows import FreeSwim, Window2D, Window3D, WindowAttention

    if args.window is None and (args.window_dilation is not None or args.window_steps != (0.0, 1.0)):
        raise UsageError("--window-dilation and --window-steps need --window")
    if args.window is not None and args.freeswim:
        raise UsageError("--window and --freeswim are two window methods: give one")
    if args.freeswim:
        return [FreeSwim(steps=args.window_steps)]
    if args.window is None:
        return []
    axes = 3 if args.kind == "video" else 2
    kernel = args.window * axes if len(args.window) == 1 and axes == 2 else args.window
    if len(kernel) != axes:
        raise UsageError(f"--window={','.join(map(str, args.window))}: expected {axes} kernel sizes for "
                         f"{'video (frames, rows, cols)' if axes == 3 else 'images (rows, cols)'}")
    dilation = args.window_dilation or (1,)
    dilation = dilation * axes if len(dilation) == 1 else dilation
    spec = (Window3D if axes == 3 else Window2D)(kernel_size=kernel, dilation=dilation)
    return [WindowAttention(spec, steps=args.window_steps)]


def _objective(text: str) -> str:
    if text in OBJECTIVES or (text.startswith("clip:") and text[5:]):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected {' | '.join(OBJECTIVES)} | clip:<CLIP model id>")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmattn", description="Training-free attention interventions for diffusion models and VLMs.")
    parser.add_argument("--version", action="version", version=f"mmattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate images with an attention intervention; writes images + settings.json")
    _generation_args(gen, DEFAULT_MODEL, "softpag", "outputs/generate", frames=False)
    gen.set_defaults(run=_generate, kind="image", prog=gen.prog)
    video = sub.add_parser("video", help="generate videos (Wan) with an intervention; writes animated WebPs + settings.json")
    _generation_args(video, DEFAULT_VIDEO_MODEL, "stg", "outputs/video", frames=True)
    video.set_defaults(run=_generate, kind="video", prog=video.prog)

    heads = sub.add_parser("heads", help="attention heads: HeadHunter search for SoftPAG")
    heads_sub = heads.add_subparsers(dest="heads_command", metavar="ACTION", required=True)
    search = heads_sub.add_parser("search", help="greedy HeadHunter search; writes heads.json with a SoftPAG head spec")
    search.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"image or video model: id, local folder or tiny/<name> (default {DEFAULT_MODEL})")
    search.add_argument("--objective", type=_objective, default="sharpness",
                        help=f"{' | '.join(OBJECTIVES)} | clip:<CLIP model id> (default sharpness)")
    search.add_argument("--prompt", action="append", help="prompt (repeat; default: two built-in prompts)")
    search.add_argument("--seed", action="append", type=_seed, help="seed (repeat; default 0)")
    search.add_argument("--rounds", type=_int_type(1), default=1, help="greedy rounds R (default 1)")
    search.add_argument("--top-k", type=_int_type(1), default=2, help="heads kept per round k (default 2)")
    search.add_argument("--layers", help="restrict candidates to a head spec (default: every self-attention head)")
    search.add_argument("--strength", type=float, default=1.0, help="SoftPAG blend u used while searching")
    search.add_argument("--scale", type=float, default=3.0, help="perturbation guidance scale s")
    _call_args(search, frames=True)
    _machine_args(search)
    search.add_argument("--out", default="outputs/heads",
                        help="output folder: heads.json and checkpoint.json; a checkpoint.json there is resumed")
    search.add_argument("--overwrite", action="store_true",
                        help="start afresh: delete --out's checkpoint.json and heads.json (other files stay); "
                             "needed for a non-empty --out without checkpoint.json")
    search.set_defaults(run=_heads_search, prog=search.prog)

    evaluate = sub.add_parser("eval", help="evaluation on the shapes world: accuracy tables and plots")
    eval_sub = evaluate.add_subparsers(dest="eval_command", metavar="TASK", required=True)
    vqa_eval = eval_sub.add_parser("vqa", help="shapes-vlm accuracy per question type for every pruning method at "
                                   "keep 33/22/11%%; writes vqa.md, vqa.json and (with matplotlib) vqa.png")
    vqa_eval.add_argument("--questions", type=_int_type(6), default=600, help="test-split questions (default 600)")
    vqa_eval.add_argument("--out", default="bench/results/shapes", help="output folder (default bench/results/shapes)")
    vqa_eval.set_defaults(run=_eval_vqa, prog=vqa_eval.prog)
    gen_eval = eval_sub.add_parser("gen", help="shapes-t2i prompt adherence and Frechet distance for CFG alone and "
                                   "with PAG, SoftPAG, SEG, SLG at several CFG scales; writes gen.md, gen.json, gen.png")
    gen_eval.add_argument("--images", type=_int_type(2), default=100, help="test-split prompts (default 100)")
    gen_eval.add_argument("--steps", type=_int_type(1, 1001, "an int in [1, 1000]"), default=None,
                          help="denoising steps (default 20)")
    gen_eval.add_argument("--out", default="bench/results/shapes", help="output folder (default bench/results/shapes)")
    gen_eval.set_defaults(run=_eval_gen, prog=gen_eval.prog)

    vqa = sub.add_parser("vqa", help="answer a question about images with a VLM, without and with a method",
                         description="Answer a question about images with a VLM, without and with a pruning or sink "
                                     "method; e.g. mmattn vqa --question 'what color is the circle' --method fastv "
                                     "--layer 2 --keep 0.33")
    vqa.add_argument("--model", default=DEFAULT_VQA_MODEL, help=f"VLM id, local folder or tiny/<name> "
                     f"(default {DEFAULT_VQA_MODEL})")
    vqa.add_argument("--image", action="append", type=Path,
                     help="image file (repeat: several images in one question; default: a shapes-world scene)")
    vqa.add_argument("--scene-seed", type=_seed, default=7, help="the shapes-world scene without --image (default 7)")
    vqa.add_argument("--question", default="what color is the circle", help="the question (default: a shapes one)")
    vqa.add_argument("--method", choices=(*VLM_METHODS, "none"), default="fastv", help="method (default fastv)")
    for flag, owners in VLM_FLAGS.items():
        f = next(g for g in methods.settings(owners[0]) if g.name == flag)
        vqa.add_argument(f"--{flag.replace('_', '-')}", dest=f"vlm_{flag}", type=_literal, metavar="VALUE",
                         help=f"{'/'.join(owners)}: {f.metadata.get('help') or flag} (a number, none, JSON or text)")
    vqa.add_argument("--max-new-tokens", type=_int_type(1, 1025, "an int in [1, 1024]"), default=16)
    _machine_args(vqa)
    vqa.set_defaults(run=_vqa, prog=vqa.prog)

    demo = sub.add_parser("demo", help="the Gradio demo: baseline beside an intervention, for generation and VQA",
                          description="Serve the Gradio demo (needs mmattn[demo]); e.g. mmattn demo --port 7860")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine only)")
    demo.add_argument("--port", type=_int_type(1, 65536, "an int in [1, 65535]"), default=7860,
                      help="port (default 7860)")
    demo.set_defaults(run=_demo, prog=demo.prog)

    bench = sub.add_parser("bench", help="run a benchmark script of the source tree (bench/bench_<name>.py)",
                           description="Run bench/bench_<name>.py of an mmattn source checkout; the arguments after "
                                       "the name go to the script (see its --help)")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("arguments", nargs=argparse.REMAINDER, help="the script's own arguments")
    bench.set_defaults(run=_bench, prog=bench.prog)
    for prefix, action in [("", parser._subparsers._group_actions[0]), ("heads ", heads_sub), ("eval ", eval_sub)]:
        for name, subparser in action.choices.items():
            subparser.epilog = f"example: {EXAMPLES[prefix + name]}"
    return parser


def _generation_args(parser, default_model: str, default_method: str, default_out: str, frames: bool) -> None:
    """The flags of generate and video. Method flags default to None (not given); the config fills its defaults."""
    parser.add_argument("--model", default=default_model, help=f"model id, local folder or tiny/<name> (default {default_model})")
    parser.add_argument("--prompt", action="append", help="prompt (repeat for several; default: one built-in prompt)")
    parser.add_argument("--seed", action="append", type=_seed, help="seed (repeat for several; default 0)")
    parser.add_argument("--method", choices=(*METHODS, "none"), default=default_method,
                        help=f"intervention (default {default_method})")
    parser.add_argument("--heads", help="head or layer selection, e.g. 'transformer_blocks.1:0,2' (default: the middle block)")
    _method_args(parser)
    _call_args(parser, frames)
    parser.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale w")
    _machine_args(parser)
    kernel = "FRAMES,ROWS,COLS" if frames else "K or ROWS,COLS"
    parser.add_argument("--window", type=_kernel, metavar=kernel,
                        help="window attention (NATTEN semantics) on every self-attention layer, with the method: the "
                             f"kernel in tokens ({'3 axes' if frames else '1 or 2 axes'}), e.g. "
                             f"{'3,9,9' if frames else '9'}")
    parser.add_argument("--window-dilation", type=_kernel, metavar="D", help="the window's dilation (default 1)")
    parser.add_argument("--window-steps", type=_fractions, metavar="START,STOP", default=(0.0, 1.0),
                        help="fractions [start, stop) of the steps that use the window (default 0,1)")
    parser.add_argument("--methods", type=Path, metavar="FILE",
                        help="a JSON (or YAML) list of method settings as settings.json writes them, e.g. "
                             '[{"method": "pag", "heads": "transformer_blocks.1:*"}, {"method": "seg", "heads": '
                             '"transformer_blocks.2:*"}]: all applied together in one variant, instead of --method')
    parser.add_argument("--freeswim", action="store_true",
                        help="FreeSwim with the method: windows of the training-scale grid, entropy scaling")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline and the side-by-side comparison")
    parser.add_argument("--from", dest="from_settings", metavar="SETTINGS_JSON",
                        help="run again what a settings.json records (model, methods, prompts, seeds, call, device, "
                             "dtype), into --out; the other generation flags are not read")
    parser.add_argument("--out", default=default_out, help=f"output folder (default {default_out})")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out, first deleting what an earlier run wrote there (settings.json, "
                             "comparison.*, the images in baseline/ and the method folders); other files stay")


def _method_args(parser) -> None:
    """One flag per setting of the registered diffusion methods, from the config fields (help, choices, defaults)."""
    seen: dict[str, list] = {}
    for name in METHODS:
        for f in methods.settings(name):
            if f.name not in SELECTION_FIELDS:
                seen.setdefault(f.name, []).append((name, f))
    for flag, owners in seen.items():
        f = owners[0][1]
        users = "every method" if flag in GUIDANCE_FLAGS else "/".join(name for name, _ in owners)
        defaults = ", ".join(f"{name} {g.default}" for name, g in owners)
        text = f"{users}: {f.metadata.get('help', flag)} (default: {defaults})"
        if isinstance(f.default, bool):
            parser.add_argument(f"--{flag.replace('_', '-')}", dest=flag, action=argparse.BooleanOptionalAction,
                                help=text)
        else:
            parser.add_argument(f"--{flag}", type=type(f.default), choices=f.metadata.get("choices"), help=text)


def _call_args(parser, frames: bool) -> None:
    parser.add_argument("--steps", type=_int_type(1), help="denoising steps (default: the model's)")
    parser.add_argument("--height", type=_int_type(1), help="pixels; a multiple of the model's VAE scale x patch size")
    parser.add_argument("--width", type=_int_type(1), help="pixels; a multiple of the model's VAE scale x patch size")
    if frames:
        parser.add_argument("--num-frames", type=_int_type(1), help="video models: frames (Wan: 4k+1; default: the model's)")


def _machine_args(parser) -> None:
    parser.add_argument("--device", type=_device, help="torch device (default: cuda where available, else cpu)")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="weights' dtype (default: bfloat16 on cuda, float16 where the GPU lacks bfloat16; float32 else)")


def _eval_gen(args) -> int:
    from .shapes import evaluate

    result = evaluate.run_gen(args.images, args.steps, Path(args.out))
    print(evaluate.gen_markdown(result), end="")
    print(f"wrote {Path(args.out) / 'gen.md'} and gen.json" + (", gen.png" if (Path(args.out) / "gen.png").exists() else ""))
    return 0


def _eval_vqa(args) -> int:
    from .shapes import evaluate

    result = evaluate.run(args.questions, Path(args.out))
    print(evaluate.markdown(result), end="")
    print(f"wrote {Path(args.out) / 'vqa.md'} and vqa.json" + (", vqa.png" if (Path(args.out) / "vqa.png").exists() else ""))
    return 0


def _bench(args) -> int:
    """bench/bench_<name>.py of the source tree this mmattn runs from, with the arguments after the name."""
    import runpy

    script = Path(__file__).resolve().parents[1] / "bench" / f"bench_{args.name}.py"
    if not script.is_file():
        raise ValueError(f"{script} is not here: the benchmarks are scripts of an mmattn source checkout "
                         "(git clone the repository and pip install -e .)")
    saved = sys.argv
    sys.argv = [str(script), *args.arguments]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 0
    finally:
        sys.argv = saved
    return 0


def _device_and_dtype(args) -> tuple[torch.device, torch.dtype]:
    """--device and --dtype, or the defaults: cuda in bfloat16 (float16 without bf16 support), else cpu in float32."""
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"--device={device} is not available here ({reason}); expected cpu"
                             f"{' or cuda' if torch.cuda.is_available() else ''}") from error
    if args.dtype:
        return device, getattr(torch, args.dtype)
    if device.type == "cuda":
        return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return device, torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checked_out(path: str, overwrite: bool, resumable: str | None = None) -> Path:
    """The --out folder, refused before any work when it cannot be written or, without --overwrite, holds files
    (``resumable``: a file there that the command resumes from)."""
    out = Path(path)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out={path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out={path}: {existing} is not writable")
    if out.is_dir() and any(out.iterdir()) and not overwrite and not (resumable and (out / resumable).is_file()):
        raise ValueError(f"--out={path} is not empty: pass --overwrite to replace the outputs of an earlier run, "
                         "or choose another folder")
    return out


def _clear_outputs(out: Path, files: tuple[str, ...], folders: tuple[str, ...] = ()) -> None:
    """--overwrite: delete what an earlier run wrote into ``out``: ``files``, and the per-prompt images in ``folders``."""
    for name in files:
        (out / name).unlink(missing_ok=True)
    for folder in (out / name for name in folders):
        if folder.is_dir():
            for image in [*folder.glob("prompt*_seed*.png"), *folder.glob("prompt*_seed*.webp"),
                          *folder.glob("prompt*_seed*.png.json"), *folder.glob("prompt*_seed*.webp.json")]:
                image.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()


def _check_method_flags(args) -> None:
    """A method flag given for another method than --method is an error, not silently dropped."""
    applicable = () if args.method == "none" else COMMON_FLAGS + METHOD_FLAGS[args.method]
    for flag in dict.fromkeys(COMMON_FLAGS + sum(METHOD_FLAGS.values(), ())):
        if getattr(args, flag) is not None and flag not in applicable:
            methods = [m for m, flags in METHOD_FLAGS.items() if flag in COMMON_FLAGS + flags]
            raise UsageError(f"--{flag} applies to --method {', '.join(methods)}; not to --method {args.method}")


def _method(args, heads: str):
    """The method config the arguments describe, on ``heads`` (None for --method none); flags not given take the
    config's defaults."""
    if args.method == "none":
        return None
    given = {flag: getattr(args, flag) for flag in GUIDANCE_FLAGS + METHOD_FLAGS[args.method]
             if getattr(args, flag) is not None}
    selection = "layers" if args.method in ("slg", "stg") else "heads"
    return METHODS[args.method](**{selection: heads}, **given)


def _size_multiple(pipe) -> int:
    """What height and width must be multiples of: the VAE's downsampling times the denoiser's patch (Flux packs
    2x2 latents into a token), and any multiple the pipeline checks itself."""
    from .adapters import diffusion_family

    family = diffusion_family(pipe)
    patch = 2 if family.name == "flux" else getattr(family.denoiser(pipe).config, "patch_size", None) or 1
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    vae = getattr(pipe, "vae_scale_factor_spatial", None) or pipe.vae_scale_factor
    return math.lcm(vae * patch, PIPELINE_SIZE_MULTIPLE.get(family.name, 1))


def _call(args, pipe) -> dict:
    """The pipeline call arguments: the flags over the model's defaults, checked against what the model accepts.
    Steps and the CFG scale are always written out (the pipeline's defaults where not given)."""
    from .hub import pipeline_defaults

    given = {key: getattr(args, flag, None) for key, flag in CALL_FLAGS.items()}
    call = pipeline_defaults(args.model) | {key: value for key, value in given.items() if value is not None}
    parameters = inspect.signature(type(pipe).__call__).parameters
    for key in ("num_inference_steps", "guidance_scale"):
        default = parameters[key].default if key in parameters else None
        if key not in call and isinstance(default, (int, float)):
            call[key] = default
    steps, trained = call["num_inference_steps"], pipe.scheduler.config.get("num_train_timesteps")
    if trained and steps > trained:
        raise ValueError(f"--steps={steps} is out of range for {args.model}: expected an int in [1, {trained}] "
                         "(its scheduler's num_train_timesteps)")
    multiple = _size_multiple(pipe)
    for key in ("height", "width"):
        if key in call and call[key] % multiple:
            raise ValueError(f"--{key}={call[key]} does not suit {args.model}: expected a multiple of {multiple}")
    if "num_frames" in call:
        temporal = getattr(pipe, "vae_scale_factor_temporal", None)
        if temporal is None:
            raise ValueError(f"--num-frames={call['num_frames']} applies to video models; {args.model} makes images")
        if (call["num_frames"] - 1) % temporal:
            raise ValueError(f"--num-frames={call['num_frames']} does not suit {args.model}: expected {temporal}k+1 "
                             f"frames (1, {temporal + 1}, {2 * temporal + 1}, ...)")
    return call


def _warn_if_unguided(prog: str, method, steps: int) -> None:
    """Say so when no step i of the run lies in the method's window: start <= i/steps < stop."""
    if not any(method.start <= i / steps < method.stop for i in range(steps)):
        print(f"{prog}: warning: {method.name} guides no step: no step i of {steps} has start={method.start} <= "
              f"i/{steps} < stop={method.stop}, so its outputs equal the baseline", file=sys.stderr)


def _generate(args) -> int:
    """Images (``generate``) or videos (``video``): baseline and intervention per prompt and seed, through
    ``mmattn.pipelines.generation.GenerationPipeline``; ``--from settings.json`` runs a recorded run again."""
    from . import apply
    from .hub import default_prompt
    from .pipelines.generation import GenerationPipeline, default_heads

    if args.from_settings is not None:
        out = _checked_out(args.out, args.overwrite)
        gen = GenerationPipeline.from_settings(args.from_settings)
    else:
        listed = _listed_methods(args)
        _check_method_flags(args)
        device, dtype = _device_and_dtype(args)
        _method(args, args.heads or "layer")  # every setting checked before the model loads; the default heads need it
        others = listed + _windows(args)  # --methods FILE and the window flags
        out = _checked_out(args.out, args.overwrite)
        gen = GenerationPipeline.from_pretrained(args.model, dtype=dtype, device=device, kinds=(args.kind,))
        gen.call = _call(args, gen.pipe)
        method = None if listed else _method(args, args.heads or default_heads(gen.pipe))
        together = ([method] if method is not None else []) + others
        gen.methods = [together if len(together) > 1 else together[0]] if together else []
        gen.compare = not args.no_baseline
        gen.prompts, gen.seeds = args.prompt or [default_prompt(args.model)], args.seed or [0]
        if method is not None:
            with apply(gen.pipe, method):  # the heads checked against the model before anything is generated
                pass
            _warn_if_unguided(args.prog, method, gen.call["num_inference_steps"])
    if args.overwrite and out.is_dir():  # a folder that does not exist yet has nothing to clear (make run's first run)
        known = set(methods.list_methods("diffusion")) | {"baseline", "none"}
        folders = tuple(p.name for p in out.iterdir() if p.is_dir() and set(p.name.split("+")) <= known)
        _clear_outputs(out, GENERATED_FILES, folders)
    run = gen.generate(out=out)
    outputs = len(run.settings["outputs"])
    kind = "videos" if gen.video else "images"
    comparison = [f.name for f in run.files if f.stem == "comparison"]
    print(f"wrote {outputs} {kind}, settings.json{' and ' + comparison[0] if comparison else ''} to {out}")
    return 0


def _literal(text: str):
    """A --flag value of a VLM method: an int, a float, none, JSON (lists: PyramidDrop's stages) or the text."""
    if text.lower() == "none":
        return None
    for parse in (int, float, json.loads):
        try:
            value = parse(text)
        except ValueError:
            continue
        return tuple(tuple(v) if isinstance(v, list) else v for v in value) if isinstance(value, list) else value
    return text


def _vqa(args) -> int:
    """The answer without and with the method, and what the method did."""
    from .pipelines.vqa import VQAPipeline

    given = {flag: getattr(args, f"vlm_{flag}") for flag in VLM_FLAGS if getattr(args, f"vlm_{flag}") is not None}
    for flag in given:
        if args.method == "none" or args.method not in VLM_FLAGS[flag]:
            raise UsageError(f"--{flag.replace('_', '-')} applies to --method {', '.join(VLM_FLAGS[flag])}; "
                             f"not to --method {args.method}")
    method = None if args.method == "none" else methods.get(args.method)(**given)  # checked before the model loads
    if args.image:
        from PIL import Image

        for path in args.image:
            if not path.is_file():
                raise ValueError(f"--image={path}: no such file")
        images = [Image.open(path).convert("RGB") for path in args.image]
    else:
        from .shapes import scenes, vlm

        images = [scenes.render(scenes.scene(args.scene_seed), vlm.IMAGE_SIZE)]
    device, dtype = _device_and_dtype(args)
    plain = VQAPipeline.from_pretrained(args.model, dtype=dtype, device=device, max_new_tokens=args.max_new_tokens)
    print(f"baseline: {plain.answer(images, args.question).answer}")
    if method is not None:
        with VQAPipeline(plain.model, plain.processor, [method], args.max_new_tokens) as steered:
            result = steered.answer(images, args.question)
        print(f"{method.name}: {result.answer}")
        if result.stats is not None:
            kept = int((result.stats.kept_image_positions[0] >= 0).sum())
            total = int((result.stats.image_positions[0] >= 0).sum())
            print(f"{method.name} kept {kept} of {total} image tokens; {result.stats.equivalent_tokens:.0f} "
                  f"equivalent tokens; prefill {result.stats.prefill_seconds * 1000:.0f} ms")
    return 0


def _demo(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ImportError("the demo needs gradio: pip install 'mmattn[demo]'") from None
    from .demos import app

    app.launch(host=args.host, port=args.port)
    return 0


def _heads_search(args) -> int:
    from .hub import load_pipeline, pipeline_kind
    from .pipelines.head_search import CLIPScore, HeadSearch

    device, dtype = _device_and_dtype(args)
    SoftPAG(heads=args.layers or "layer", strength=args.strength, scale=args.scale)  # checked before the model loads
    out = _checked_out(args.out, args.overwrite, resumable="checkpoint.json")
    objective = CLIPScore.from_pretrained(args.objective[5:]) if args.objective.startswith("clip:") else args.objective
    pipe = load_pipeline(args.model, dtype=dtype, device=device)
    call = _call(args, pipe)
    search = HeadSearch(pipe, objective, args.prompt or ["a photograph of a red fox in snow", "a watercolor of a harbour"],
                        seeds=args.seed or [0], rounds=args.rounds, top_k=args.top_k, strength=args.strength,
                        scale=args.scale, layers=args.layers, call_kwargs=call, checkpoint=out / "checkpoint.json")
    if args.overwrite:
        _clear_outputs(out, SEARCH_FILES)
    result = search.run()
    out.mkdir(parents=True, exist_ok=True)
    saved = {"model": args.model, "device": str(device), "dtype": _dtype_name(dtype), **result.to_json()}
    (out / "heads.json").write_text(json.dumps(saved, indent=2))
    print(f"heads: {result.spec}")
    command = "video" if pipeline_kind(args.model) == "video" else "generate"
    print(f"wrote {out / 'heads.json'}; use: mmattn {command} --model {args.model} --heads \"{result.spec}\"")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named by the command they were given to, not by the top-level parser as parse_args() does
        parser.exit(2, _usage_line(getattr(args, "prog", parser.prog), f"unrecognized arguments: {' '.join(unknown)}") + "\n")
    if args.command is None:
        parser.print_help()
        return 0
    from ._compat import quiet_upstream_logging

    quiet_upstream_logging()
    try:
        return args.run(args)
    except UsageError as error:
        print(_usage_line(args.prog, error), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.prog}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, RuntimeError, ImportError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{args.prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
