"""Train the shapes-world models: ``python -m mmattn.shapes.train classifier|vlm|t2i [--minutes M] [--out DIR]``.

shapes-classifier first: shapes-vlm's vision tower starts from its tower (``--vision-init``, by default the
classifier weights in ``--out`` when they exist).

Each run is reproducible from its seed (given the thread count) and writes safetensors weights plus a model
card (recipe, time, test scores) to ``--out`` (default: the package's shipped weights folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

WEIGHTS = Path(__file__).parent / "weights"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmattn.shapes.train", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("classifier", "vlm", "t2i"))
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--eval", type=int, default=600, help="test-split questions (vlm) or images (classifier, "
                        "t2i: generated) scored at the end")
    parser.add_argument("--vision-init", type=Path, default=None, help="vlm: shapes-classifier weights for the tower")
    parser.add_argument("--init", type=Path, default=None, help="vlm, t2i: weights to continue training from")
    parser.add_argument("--vae-minutes", type=float, default=6.0, help="t2i: minutes of VAE training first")
    parser.add_argument("--vae-steps", type=int, default=3000, help="t2i: steps of VAE training first")
    parser.add_argument("--vae-init", type=Path, default=None, help="t2i: keep this shapes-t2i file's VAE (no VAE training)")
    parser.add_argument("--vae-perceptual", type=float, default=1.0,
                        help="t2i: weight of the VAE's perceptual loss on shapes-classifier features (0: none)")
    parser.add_argument("--ema", type=float, default=0.999, help="t2i: EMA decay of the denoiser weights kept (0: none)")
    parser.add_argument("--dataset", type=int, default=20000, help="t2i: train-split scenes whose latents are cached")
    parser.add_argument("--two-objects", type=float, default=None,
                        help="t2i: share of two-object scenes among them (default: the generator's, half)")
    parser.add_argument("--train-vision", action="store_true", help="vlm: train the vision tower too (default: frozen)")
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from . import classifier, t2i, vlm

    command = "python -m mmattn.shapes.train " + " ".join(sys.argv[1:] if argv is None else argv)
    common = dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, minutes=args.minutes,
                  out=args.out, command=command)
    if args.model == "classifier":
        card = classifier.train(**common, eval_images=args.eval)
    elif args.model == "t2i":
        card = t2i.train(**common, eval_images=args.eval, vae_steps=args.vae_steps, vae_minutes=args.vae_minutes,
                         dataset=args.dataset, two_objects=args.two_objects, init=args.init, vae_init=args.vae_init,
                         ema=args.ema or None, vae_perceptual=args.vae_perceptual)
    else:
        init = args.vision_init or (args.out / classifier.WEIGHTS.name)
        card = vlm.train(**common, eval_questions=args.eval, vision_init=init if init.exists() else None,
                         init=args.init, freeze_vision=not args.train_vision)
    print(json.dumps(card["test"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
