"""HeadHunter head search (arXiv 2506.10978): greedy selection of attention heads for SoftPAG.

Each round tries every remaining (layer, head) added to the heads chosen so far, generates images
for M prompt-seed pairs with ``SoftPAG(heads=chosen + candidate)``, scores them with an objective,
and keeps the top k. The result is a head spec that ``SoftPAG(heads=...)`` accepts directly.

Deviation from the paper: the objective is a plug-in callable on images; the ones shipped here run
offline (image statistics, or a CLIP model you load); the paper uses learned reward models
(e.g. PickScore) and style similarity, which plug in the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmattn.adapters import diffusion_family
from mmattn.api import apply
from mmattn.configs import SoftPAG

Objective = Callable[[torch.Tensor, Sequence[str]], torch.Tensor]
"""(images (B, 3, H, W) float32 on the CPU in [0, 1], prompts) -> score per image, higher is better."""


def sharpness(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Variance of the Laplacian of the grey image: a no-weights proxy for detail."""
    grey = images.mean(dim=1, keepdim=True)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=grey.dtype).view(1, 1, 3, 3)
    return torch.nn.functional.conv2d(grey, kernel).flatten(1).var(dim=1)


def colorfulness(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Hasler & Süsstrunk (2003) colourfulness on [0, 255] RGB."""
    r, g, b = (images * 255).unbind(dim=1)
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    return torch.sqrt(rg.var(1) + yb.var(1)) + 0.3 * torch.sqrt(rg.mean(1) ** 2 + yb.mean(1) ** 2)


class CLIPScore:
    """Cosine similarity of CLIP image and prompt embeddings (a CLIPModel and its processor)."""

    def __init__(self, model, processor):
        self.model, self.processor = model.eval(), processor

    @classmethod
    def from_pretrained(cls, model_id: str = "openai/clip-vit-large-patch14") -> CLIPScore:
        """Offline, a model not in the cache fails with one line naming the id and HF_HUB_OFFLINE."""
        from mmattn.hub import load_clip

        return cls(*load_clip(model_id))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(text=list(prompts), images=list(images), return_tensors="pt", padding=True, do_rescale=False)
        out = self.model(**inputs)
        return torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)


def adherence(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Shapes-world prompt adherence by the shipped shapes-classifier (``mmattn.shapes.classifier.adherence``)."""
    from mmattn.shapes.classifier import adherence as shapes_adherence

    return shapes_adherence(images, prompts)


OBJECTIVES: dict[str, Objective] = {"sharpness": sharpness, "colorfulness": colorfulness, "adherence": adherence}


def heads_to_spec(heads: Sequence[tuple[str, int]]) -> str:
    """[(layer, head), ...] -> "layer:h,h; layer:h" in model order of first appearance."""
    by_layer: dict[str, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    return "; ".join(f"{layer}:{','.join(map(str, sorted(hs)))}" for layer, hs in by_layer.items())


@dataclass
class HeadSearchResult:
    """Chosen heads in order of selection, each round's scores, and the spec for SoftPAG."""

    chosen: list[tuple[str, int]]
    rounds: list[dict[str, float]]
    baseline: float
    settings: dict = field(default_factory=dict)

    @property
    def spec(self) -> str:
        return heads_to_spec(self.chosen)

    def to_json(self) -> dict:
        return {"spec": self.spec, **asdict(self)}


class HeadSearch:
    """Greedy HeadHunter search over a diffusers pipeline's self-attention heads.

    ``prompts`` x ``seeds`` are the M pairs; ``rounds`` (R) rounds each keep ``top_k`` (k) heads.
    ``layers`` restricts the candidates (a head spec; default every self-attention head).
    ``checkpoint`` (a JSON path) is written after every candidate and resumed from when it matches.
    """

    def __init__(self, pipe, objective: Objective | str, prompts: Sequence[str], seeds: Sequence[int] = (0,),
                 rounds: int = 1, top_k: int = 1, strength: float = 1.0, scale: float = 3.0,
                 layers: str | None = None, call_kwargs: dict | None = None, checkpoint: str | Path | None = None,
                 progress: bool = True):
        if isinstance(objective, str):
            if objective not in OBJECTIVES:
                raise ValueError(f"objective={objective!r}: expected one of {sorted(OBJECTIVES)} or a callable")
            objective = OBJECTIVES[objective]
        if rounds < 1 or top_k < 1:
            raise ValueError(f"rounds={rounds}, top_k={top_k}: both must be >= 1")
        if not prompts or not seeds:
            raise ValueError("prompts and seeds must each hold at least one entry")
        family = diffusion_family(pipe)
        attention = family.attention_layers(family.denoiser(pipe))
        if layers is not None:
            from mmattn.heads import resolve_heads

            selected = resolve_heads(layers, {n: a.heads for n, a in attention.items()})
            self.candidates = [(n, h) for n, hs in selected.items() for h in hs]
        else:
            self.candidates = [(n, h) for n, a in attention.items() for h in range(a.heads)]
        if rounds * top_k > len(self.candidates):
            raise ValueError(f"rounds*top_k={rounds * top_k} exceeds the {len(self.candidates)} candidate heads")
        SoftPAG(heads=f"{self.candidates[0][0]}:0", strength=strength, scale=scale)  # validates strength, scale
        self.pipe, self.objective = pipe, objective
        self.prompts, self.seeds = list(prompts), list(seeds)
        self.rounds, self.top_k, self.strength, self.scale = rounds, top_k, strength, scale
        self.call_kwargs = dict(call_kwargs or {})
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.progress = progress

    @property
    def objective_name(self) -> str:
        return getattr(self.objective, "__name__", type(self.objective).__name__)

    def settings(self) -> dict:
        return {"prompts": self.prompts, "seeds": self.seeds, "rounds": self.rounds, "top_k": self.top_k,
                "strength": self.strength, "scale": self.scale, "call": self.call_kwargs,
                "objective": self.objective_name,
                "candidates": [f"{n}:{h}" for n, h in self.candidates]}

    @torch.no_grad()
    def score(self, heads: Sequence[tuple[str, int]]) -> float:
        """Mean objective over the prompt-seed pairs, with SoftPAG on ``heads`` (none: plain CFG)."""
        prompts = [p for p in self.prompts for _ in self.seeds]
        generators = [torch.Generator().manual_seed(s) for _ in self.prompts for s in self.seeds]
        call = {**self.call_kwargs, "output_type": "pt"}
        if heads:
            with apply(self.pipe, SoftPAG(heads=heads_to_spec(heads), strength=self.strength, scale=self.scale)):
                output = self.pipe(prompts, generator=generators, **call)
        else:
            output = self.pipe(prompts, generator=generators, **call)
        images = output.frames if hasattr(output, "frames") else output.images
        frames = images.shape[1] if images.ndim == 5 else 1
        if images.ndim == 5:  # video (B, F, C, H, W): score every frame with its prompt
            prompts = [p for p in prompts for _ in range(frames)]
            images = images.flatten(0, 1)
        scores = self.objective(images.float().cpu(), prompts)
        nan = torch.isnan(scores).nonzero().flatten()
        if len(nan):
            pair = int(nan[0]) // frames
            prompt, seed = self.prompts[pair // len(self.seeds)], self.seeds[pair % len(self.seeds)]
            raise ValueError(f"objective {self.objective_name!r} returned NaN for prompt {prompt!r}, seed {seed} "
                             f"(heads: {heads_to_spec(heads) or 'none'})")
        return float(scores.mean())

    def _load(self) -> dict:
        if self.checkpoint and self.checkpoint.exists():
            try:
                state = json.loads(self.checkpoint.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"checkpoint {self.checkpoint} is not valid JSON ({error}); delete it to start the "
                                 "search afresh") from error
            if not (isinstance(state, dict) and isinstance(state.get("rounds"), list)
                    and isinstance(state.get("chosen"), list) and "baseline" in state):
                raise ValueError(f"checkpoint {self.checkpoint} is not a head search checkpoint (expected an object with "
                                 "settings, baseline, rounds and chosen); delete it to start the search afresh")
            if state.get("settings") != self.settings():
                raise ValueError(f"checkpoint {self.checkpoint} was written with other settings; "
                                 "use another path or delete it")
            return state
        return {"settings": self.settings(), "baseline": None, "rounds": [], "chosen": []}

    def _save(self, state: dict) -> None:
        if self.checkpoint:
            self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            self.checkpoint.write_text(json.dumps(state, indent=1))

    def run(self) -> HeadSearchResult:
        saved_bar = dict(getattr(self.pipe, "_progress_bar_config", {}))
        self.pipe.set_progress_bar_config(disable=True)
        try:
            return self._run()
        finally:
            self.pipe._progress_bar_config = saved_bar

    def _run(self) -> HeadSearchResult:
        state = self._load()
        if state["baseline"] is None:
            state["baseline"] = self.score([])
            self._save(state)
        chosen = [tuple(c) for c in state["chosen"]]
        total = sum(len(self.candidates) - r * self.top_k for r in range(self.rounds))
        bar = tqdm(total=total, desc="head search", unit="head", disable=not self.progress)
        bar.update(sum(len(r) for r in state["rounds"]))
        for r in range(len(state["chosen"]) // self.top_k, self.rounds):
            if len(state["rounds"]) <= r:
                state["rounds"].append({})
            scores = state["rounds"][r]
            for layer, head in self.candidates:
                key = f"{layer}:{head}"
                if (layer, head) in chosen or key in scores:
                    continue
                scores[key] = self.score(chosen + [(layer, head)])
                bar.set_postfix(round=r + 1, best=max(scores.values()))
                bar.update()
                self._save(state)
            best = sorted(scores, key=scores.get, reverse=True)[: self.top_k]
            chosen += [(k.rpartition(":")[0], int(k.rpartition(":")[2])) for k in best]
            state["chosen"] = [list(c) for c in chosen]
            self._save(state)
        bar.close()
        return HeadSearchResult(chosen=chosen, rounds=state["rounds"], baseline=state["baseline"], settings=self.settings())
