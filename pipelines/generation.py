"""GenerationPipeline: images and videos from a diffusers pipeline with mmattn methods, baseline beside them.

    gen = GenerationPipeline.from_pretrained("mmattn/shapes-t2i", methods=[SoftPAG(heads="transformer_blocks.2:*")])
    run = gen.generate(["a red circle left of a blue square"], seeds=[0, 1], out="outputs/fox")
    run.images["softpag"][0], run.settings            # PIL images (videos: lists of frames), what ran
    GenerationPipeline.from_settings("outputs/fox/settings.json").generate(out="outputs/again")  # the same files

Each (prompt, seed) runs once per variant: ``baseline`` (no method; with ``compare=True``) and the methods, all
from the same seed. ``out`` receives one PNG per image (an animated WebP per video) in a folder per variant, a
``comparison`` picture with the variants side by side, and ``settings.json``: every setting needed to run it again
(model, device, dtype, methods, prompts, seeds, the pipeline call) and the files written. Models load by id:
``mmattn/shapes-*`` and ``tiny/<name>`` offline, anything else through diffusers' ``from_pretrained``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import mmattn
from mmattn import methods as registry
from mmattn import hub

VIDEO_SUFFIX, IMAGE_SUFFIX = "webp", "png"


@dataclass
class GenerationRun:
    """What one ``generate`` made: per variant, one output per (prompt, seed) in order (an image, or a video's
    frames), the settings that reproduce it and, with ``out``, the files written."""

    images: dict[str, list] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def default_heads(pipe) -> str:
    """Every head of the denoiser's middle block: the head selection used when none is given."""
    from mmattn.adapters import diffusion_family

    family = diffusion_family(pipe)
    layers = list(family.attention_layers(family.denoiser(pipe)))
    return f"{layers[len(layers) // 2]}:*"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class GenerationPipeline:
    """A loaded diffusers pipeline, its model id, the methods to compare against the baseline, and the call."""

    def __init__(self, pipe, model_id: str, methods: Sequence[Any] = (), call: dict | None = None,
                 prompts: Sequence[str] = (), seeds: Sequence[int] = (0,), compare: bool = True):
        self.pipe, self.model_id = pipe, model_id
        self.methods = list(methods)
        self.call = dict(call or {})
        self.prompts, self.seeds, self.compare = list(prompts), list(seeds), compare
        self.video = hasattr(pipe, "vae_scale_factor_temporal")

    @classmethod
    def from_pretrained(cls, model_id: str, methods: Sequence[Any] = (), dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", kinds: tuple[str, ...] = ("image", "video"),
                        **options) -> GenerationPipeline:
        """Load ``model_id`` (a hub id, a local folder, ``tiny/<name>`` or ``mmattn/shapes-*``) on ``device``;
        a model of a kind outside ``kinds`` is refused before it loads. ``call`` (in ``options``) goes over the
        call arguments that suit the model (``hub.pipeline_defaults``: the shipped and tiny models' sizes)."""
        pipe = hub.load_pipeline(model_id, dtype=dtype, kinds=kinds, device=torch.device(device))
        pipe.set_progress_bar_config(leave=False)
        options["call"] = hub.pipeline_defaults(model_id) | dict(options.get("call") or {})
        return cls(pipe, model_id, methods, **options)

    @classmethod
    def from_settings(cls, path: str | Path) -> GenerationPipeline:
        """The pipeline, methods, prompts, seeds and call a ``settings.json`` records: ``generate()`` then runs the
        same generations again (bit for bit on the same machine and versions)."""
        settings = json.loads(Path(path).read_text())
        missing = {"model", "device", "dtype", "methods", "prompts", "seeds", "call"} - set(settings)
        if missing:
            raise ValueError(f"{path} is not a settings.json that GenerationPipeline wrote: it lacks {sorted(missing)}")
        dtype = getattr(torch, settings["dtype"])
        methods = [[registry.from_dict(x) for x in m] if isinstance(m, list) else registry.from_dict(m)
                   for m in settings["methods"]]
        return cls.from_pretrained(settings["model"], methods, dtype=dtype, device=settings["device"],
                                   call=settings["call"], prompts=settings["prompts"], seeds=settings["seeds"],
                                   compare=settings.get("compare", True))

    def variants(self) -> list[tuple[str, Any]]:
        """(label, method or None) in run order: the baseline first when comparing, then each method; an entry of
        ``methods`` that is a list of configs is one variant with all of them applied ("softpag+window")."""
        return ([("baseline", None)] if self.compare or not self.methods else []) + [
            ("+".join(m.name for m in method) if isinstance(method, (list, tuple)) else method.name, method)
            for method in self.methods]

    def generate(self, prompts: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
                 out: str | Path | None = None, progress: bool = True, first_index: int = 0,
                 summary: bool = True) -> GenerationRun:
        """Every variant for every (prompt, seed) (the pipeline's own when not given); files into ``out``, each
        with a sidecar ``<file>.json`` (what reproduces it alone: model, method, prompt, seed, call, device, dtype).
        Files are named by prompt index from ``first_index`` (a process's share of a longer list); ``summary``:
        also the comparison picture and settings.json."""
        from tqdm.auto import tqdm

        prompts = list(prompts or self.prompts)
        seeds = list(seeds if seeds is not None else self.seeds)
        if not prompts:
            raise ValueError("no prompt: pass prompts=[...] (or build the pipeline with prompts)")
        for seed in seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
                raise ValueError(f"seed={seed!r}: expected an int with 0 <= seed < 2**64")
        for method in self.methods:  # heads and layers checked against this model before anything runs
            with mmattn.apply(self.pipe, list(method) if isinstance(method, (list, tuple)) else method):
                pass
        out = None if out is None else Path(out)
        variants = self.variants()
        call = self.call | {"output_type": "pil"}
        run = GenerationRun(images={label: [] for label, _ in variants})
        records, started = [], time.perf_counter()
        jobs = [(p, s) for p in range(len(prompts)) for s in seeds]
        for p, seed in tqdm(jobs, desc="generate", unit="video" if self.video else "image", disable=not progress):
            for label, method in variants:
                generator = torch.Generator("cpu").manual_seed(seed)
                if method is None:
                    output = self.pipe(prompts[p], generator=generator, **call)
                else:
                    with mmattn.apply(self.pipe, list(method) if isinstance(method, (list, tuple)) else method):
                        output = self.pipe(prompts[p], generator=generator, **call)
                result = list(output.frames[0]) if self.video else output.images[0]
                run.images[label].append(result)
                if out is not None:
                    index = first_index + p
                    path = out / label / f"prompt{index:02d}_seed{seed}.{VIDEO_SUFFIX if self.video else IMAGE_SUFFIX}"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    save(result if self.video else [result], path)
                    sidecar = {"model": self.model_id, "pipeline": type(self.pipe).__name__, **self._machine(),
                               "method": None if method is None else _described(method), "prompt": prompts[p],
                               "prompt_index": index, "seed": seed, "call": self.call}
                    path.with_name(path.name + ".json").write_text(json.dumps(sidecar, indent=2))
                    run.files += [path, path.with_name(path.name + ".json")]
                    records.append({"variant": label, "prompt_index": index, "seed": seed,
                                    "file": str(path.relative_to(out))})
        first = run.images[variants[0][0]][0]
        frame = first[0] if self.video else first
        ran = {"height": frame.height, "width": frame.width} | ({"num_frames": len(first)} if self.video else {})
        run.settings = {
            "mmattn_version": mmattn.__version__, "model": self.model_id, "pipeline": type(self.pipe).__name__,
            **self._machine(),
            "methods": [_described(m) for m in self.methods], "compare": self.compare, "prompts": prompts,
            "seeds": seeds, "call": self.call | ran, "outputs": records,
            "seconds": round(time.perf_counter() - started, 3)}
        if out is not None and summary:
            if len(variants) > 1:
                labels = [label for label, _ in variants]
                rows = [[run.images[label][i] for label in labels] for i in range(len(jobs))]
                path = out / f"comparison.{VIDEO_SUFFIX if self.video else IMAGE_SUFFIX}"
                frames = len(rows[0][0]) if self.video else 1
                save([comparison_grid([[r[t] if self.video else r for r in row] for row in rows], labels)
                      for t in range(frames)], path)
                run.files.append(path)
            (out / "settings.json").write_text(json.dumps(run.settings, indent=2))
            run.files.append(out / "settings.json")
        return run


    def _machine(self) -> dict:
        denoiser = next(self.pipe.components[n] for n in ("unet", "transformer") if self.pipe.components.get(n))
        parameter = next(denoiser.parameters())
        return {"device": str(parameter.device), "dtype": dtype_name(parameter.dtype)}


def _described(method) -> dict | list[dict]:
    return [m.to_dict() for m in method] if isinstance(method, (list, tuple)) else method.to_dict()


def save(frames: list, path: Path) -> None:
    """One frame as PNG, several as a looping animated WebP (8 frames per second, lossless)."""
    if len(frames) == 1 and path.suffix == f".{IMAGE_SUFFIX}":
        frames[0].save(path)
    else:
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=125, loop=0, lossless=True)


def comparison_grid(rows: list[list], labels: list[str]):
    """Side-by-side picture: one column per label, one row per (prompt, seed); small images enlarged."""
    from PIL import Image, ImageDraw

    zoom = max(1, 128 // rows[0][0].width)
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
