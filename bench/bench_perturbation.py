"""Benchmark: cost of SoftPAG guidance per denoising step.

Compares, side by side in one run, one denoiser call of
  - CFG alone (batch [uncond, cond]),
  - CFG + SoftPAG (the perturbed branch batched in: [uncond, cond, perturbed]); target <= 1.6x,
  - head-level SoftPAG (2 heads per layer) vs layer-level PAG (all heads); target < 5% apart,
  - PAG on the middle block alone, forked there (blocks before it run on [uncond, cond] only) vs the whole
    perturbed branch (GuidedDenoiser.fork off); target <= 1.3x CFG forked,
on a mid-size SD3 transformer with random weights (the real architecture, smaller).

    python bench/bench_perturbation.py --out bench/results/perturbation_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from datetime import date
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel

import mmattn
from mmattn import SoftPAG
from mmattn.guidance import GuidedDenoiser
from mmattn.testing import build_tiny


def mid_size_sd3(layers: int, heads: int, head_dim: int, sample: int) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(sample_size=sample, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
                                 attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=256,
                                 caption_projection_dim=heads * head_dim, pooled_projection_dim=128,
                                 pos_embed_max_size=sample).eval()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--latent", type=int, default=64, help="latent side: (latent/2)^2 image tokens")
    parser.add_argument("--text-tokens", type=int, default=154)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/perturbation_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    pipe = build_tiny("tiny/sd3")
    pipe.transformer = mid_size_sd3(args.layers, args.heads, args.head_dim, args.latent)
    pipe._guidance_scale = 5.0  # makes pipe.do_classifier_free_guidance true, as inside a call
    pipe.scheduler.set_timesteps(10)
    inputs = dict(hidden_states=torch.randn(2, 16, args.latent, args.latent), timestep=pipe.scheduler.timesteps[:1].expand(2),
                  encoder_hidden_states=torch.randn(2, args.text_tokens, 256), pooled_projections=torch.randn(2, 128),
                  return_dict=False)
    layers = ";".join(f"transformer_blocks.{i}" for i in range(args.layers // 3, 2 * args.layers // 3))
    head_level = ";".join(f"transformer_blocks.{i}:0,1" for i in range(args.layers // 3, 2 * args.layers // 3))

    middle = f"transformer_blocks.{args.layers // 2}"

    def step(config=None, fork=True):
        if config is None:
            return lambda: pipe.transformer(**inputs)
        def run():
            GuidedDenoiser.fork = fork
            try:
                with mmattn.apply(pipe, config):
                    pipe.transformer(**inputs)
            finally:
                GuidedDenoiser.fork = True
        return run

    cases = {
        "cfg": step(),
        "cfg+softpag_heads": step(SoftPAG(heads=head_level, strength=0.5, scale=3.0)),
        "cfg+pag_layers": step(SoftPAG(heads=layers, strength=1.0, scale=3.0)),
        "cfg+pag_middle_forked": step(SoftPAG(heads=middle, strength=1.0, scale=3.0)),
        "cfg+pag_middle_whole_branch": step(SoftPAG(heads=middle, strength=1.0, scale=3.0), fork=False),
    }
    seconds = {name: [] for name in cases}
    for _ in range(args.repeats):  # interleave cases so machine noise hits them alike
        for name, fn in cases.items():
            seconds[name].append(timed(fn, 1))
    median = {name: statistics.median(v) for name, v in seconds.items()}
    ratios = {
        "softpag_vs_cfg": median["cfg+softpag_heads"] / median["cfg"],
        "head_level_vs_layer_level": median["cfg+softpag_heads"] / median["cfg+pag_layers"],
        "pag_middle_forked_vs_cfg": median["cfg+pag_middle_forked"] / median["cfg"],
        "pag_middle_whole_branch_vs_cfg": median["cfg+pag_middle_whole_branch"] / median["cfg"],
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"date": date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads", "torch": torch.__version__, "commit": commit,
              "model": {"layers": args.layers, "heads": args.heads, "head_dim": args.head_dim,
                        "image_tokens": (args.latent // 2) ** 2, "text_tokens": args.text_tokens},
              "seconds_per_step": median, "ratios": ratios,
              "targets": {"softpag_vs_cfg": "<= 1.6", "head_level_vs_layer_level": "within 5%",
                          "pag_middle_forked_vs_cfg": "<= 1.3"}}
    print(f"{'case':<30}{'s/step':>10}")
    for name, value in median.items():
        print(f"{name:<30}{value:>10.4f}")
    for name, value in ratios.items():
        print(f"{name:<32}{value:>8.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
