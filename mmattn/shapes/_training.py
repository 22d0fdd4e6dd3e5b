"""The training loop and the weights-and-card writer shared by the shapes-world models."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm


def fit(model: torch.nn.Module, loss_of_step: Callable[[], torch.Tensor], steps: int, lr: float,
        minutes: float | None = None, log_every: int = 100, clip: float | None = None,
        desc: str = "training", betas: tuple[float, float] = (0.9, 0.999), ema: float | None = None) -> dict:
    """AdamW (weight decay 0.01) over ``model``'s trainable parameters, linear warmup over the first 5 % of
    ``steps`` then cosine decay; ``loss_of_step()`` draws a batch and returns its loss. Stops after ``steps`` or
    ``minutes``. With ``ema`` (a decay such as 0.999) the parameters end as their exponential moving average
    (decay ``min(ema, (1 + step) / (10 + step))``, the usual warmup). Returns {"steps", "minutes", "history"}
    (the loss every ``log_every`` steps)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    average = [p.detach().clone() for p in parameters] if ema is not None else None
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, betas=betas)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
    model.train()
    started, history, done = time.perf_counter(), [], 0
    with tqdm(total=steps, desc=desc, mininterval=5) as bar:
        for step in range(steps):
            loss = loss_of_step()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(parameters, clip)
            optimizer.step()
            schedule.step()
            if average is not None:
                weight = 1 - min(ema, (1 + step) / (10 + step))
                with torch.no_grad():
                    for mean, p in zip(average, parameters):
                        mean.lerp_(p, weight)
            done = step + 1
            bar.update()
            if done % log_every == 0:
                history.append({"step": done, "loss": round(loss.item(), 4),
                                "minutes": round((time.perf_counter() - started) / 60, 2)})
                bar.set_postfix(loss=history[-1]["loss"])
            if minutes is not None and time.perf_counter() - started > minutes * 60:
                break
    if average is not None:
        with torch.no_grad():
            for p, mean in zip(parameters, average):
                p.copy_(mean)
    model.eval()
    return {"steps": done, "minutes": round((time.perf_counter() - started) / 60, 1), "history": history}


def save(model: torch.nn.Module, out: Path, weights: str, card_name: str, card: dict) -> None:
    """``model``'s state dict as safetensors ``out/weights``, ``card`` as JSON ``out/card_name`` and as a readable
    model card beside it (``.md``)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / weights)
    (out / card_name).write_text(json.dumps(card, indent=2))
    (out / card_name).with_suffix(".md").write_text(card_markdown(card))


def earlier_runs(card_file: Path) -> list[dict]:
    """The cards of the runs a continuation of ``card_file``'s run builds on, oldest first and flat (each without
    its loss history or ``continued_from``); [] when there is no such card."""
    card_file = Path(card_file)
    return _flatten_runs(json.loads(card_file.read_text())) if card_file.exists() else []


def _flatten_runs(card: dict) -> list[dict]:
    card = {k: v for k, v in card.items() if k != "history"}
    return [run for before in card.pop("continued_from", []) for run in _flatten_runs(before)] + [card]


def card_markdown(card: dict) -> str:
    """The model card: what the model is, its data and recipe, how long it trained, its test scores."""
    lines = [f"# {card['model']}", "", f"{card['architecture']}, {card['parameters']:,} parameters.", "",
             f"- data: {card.get('data', 'shapes-world train split')} (mmattn.shapes.scenes; test split disjoint)",
             f"- recipe: seed {card['seed']}, {card['steps']} steps of batch {card['batch_size']}, AdamW lr {card['lr']} "
             "(warmup 5 %, cosine decay)" + (f", weights kept: their EMA (decay {card['ema']})" if card.get("ema") else "")
             + (f"; VAE loss with shapes-classifier's perceptual term (weight {card['vae_training']['perceptual']})"
                if (card.get("vae_training") or {}).get("perceptual") else "")
             + (f", vision tower from {card['vision_init']}"
                                              + (" (frozen)" if card.get("vision_frozen") else "")
                                              if card.get("vision_init") else ""),
             f"- time: {card['train_minutes']} min on {card['threads']} CPU thread(s)"
             + (f", after {card['vae_training']['minutes']} min ({card['vae_training']['steps']} steps) of VAE training"
                if card.get("vae_training") else "")
             + "".join(f"; continued from a run of {p['steps']} steps ({p['train_minutes']} min"
                       + (f": `{p['command']}`" if p.get("command") else "") + ")"
                       for p in reversed(card.get("continued_from", []))),
             f"- reproduce: `{card.get('command') or 'python -m mmattn.shapes.train --help'}`"]
    if card.get("continued_from"):
        runs = [*card["continued_from"], card]
        vae = (card.get("vae_training") or {}).get("minutes")
        parts = ([f"{vae} min VAE"] if vae else []) + [f"{r['train_minutes']} min ({r['steps']} steps)" for r in runs]
        total = (vae or 0) + sum(r["train_minutes"] for r in runs)
        lines += [f"- time in all, oldest run first: {' + '.join(parts)} = {total:.1f} min"]
    lines += [f"- {note}" for note in card.get("notes", [])] + ["", "## Test scores", ""]
    for key, value in card["test"].items():
        if isinstance(value, dict):
            lines += [f"- {key}: " + ", ".join(f"{k} {v:.1%}" for k, v in value.items())]
        elif isinstance(value, float) and ("accuracy" in key or "exact" in key or "adherence" in key):
            lines += [f"- {key}: {value:.1%}"]
        elif isinstance(value, float):
            lines += [f"- {key}: {value:.3g}"]
        else:
            lines += [f"- {key}: {value}"]
    return "\n".join(lines) + "\n"
