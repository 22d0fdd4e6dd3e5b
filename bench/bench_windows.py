"""Benchmark: window attention against dense attention and FlexAttention on the same mask.

Side by side in one run:
  - attention only at N = 16k and 64k image tokens (square grids), a 2-D window of about 5 % element density:
    dense SDPA, mmattn.window_attention (tiles, block mask, the CPU path or Triton), and FlexAttention
    (torch.compile'd) on the same mask in the same tiled order;
    "efficiency" = dense time x element density / windowed time (1.0 = dense throughput per needed FLOP);
  - one denoiser call of a mid-size SD3 at 2x its default resolution, windowed (all layers) vs dense: a model of
    sample size 64 at latent 128 (4096 image tokens) and one of sample size 128 (SD3-medium's) at latent 256
    (16384 image tokens), each with a window of about 4 % of the grid.

    python bench/bench_windows.py --out bench/results/windows_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import mmattn
from mmattn.windows import Window2D, plan, windowed

from bench_perturbation import mid_size_sd3, timed


def flex_on_plan(window_plan, spec, grid, device):
    """FlexAttention (compiled) with the plan's own mask, in the plan's tiled order, and its block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n = math.prod(grid)
    order = window_plan.order[:n]
    coords = torch.stack(torch.meshgrid(*(torch.arange(e) for e in grid), indexing="ij"), -1).reshape(n, -1)
    table = coords[order].to(device)

    def mask_mod(b, h, q, k):
        return spec.visible((table[q, 0], table[q, 1]), (table[k, 0], table[k, 1]), grid)

    block_mask = create_block_mask(mask_mod, None, None, n, n, device=device)
    return torch.compile(flex_attention), block_mask


def attention_rows(sides, heads, head_dim, repeats, device, flex_max: int) -> list[dict]:
    rows = []
    for side in sides:
        n = side * side
        kernel = _odd(math.sqrt(0.05 * n))  # about 5 % of the grid
        spec, grid = Window2D(kernel), (side, side)
        q, k, v = (torch.randn(1, heads, n, head_dim, device=device) for _ in range(3))
        window_plan = plan(spec, grid, device=device)
        density = kernel * kernel / n
        row = {"tokens": n, "grid": list(grid), "kernel": kernel, "element_density": round(density, 4),
               "block_density": round(window_plan.mask.density, 4), "heads": heads, "head_dim": head_dim}
        row["dense_s"] = timed(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
        row["windowed_s"] = timed(lambda: windowed(q, k, v, window_plan), repeats)
        if n <= flex_max:
            attend, block_mask = flex_on_plan(window_plan, spec, grid, device)
            qp, kp, vp = (t.index_select(2, window_plan.order) for t in (q, k, v))
            row["flex_s"] = timed(lambda: attend(qp, kp, vp, block_mask=block_mask), repeats)
            row["windowed_vs_flex"] = round(row["flex_s"] / row["windowed_s"], 2)
        row["speedup_vs_dense"] = round(row["dense_s"] / row["windowed_s"], 2)
        row["efficiency"] = round(row["dense_s"] * density / row["windowed_s"], 3)
        print(json.dumps(row))
        rows.append(row)
    return rows


def denoiser_row(layers, heads, head_dim, latent, kernel, repeats, device) -> dict:
    """One SD3 transformer call at ``latent`` (2x the model's sample size), dense vs every layer windowed."""
    transformer = mid_size_sd3(layers, heads, head_dim, latent // 2).to(device)
    pipe = _PipeShell(transformer)
    inputs = dict(hidden_states=torch.randn(2, 16, latent, latent, device=device),
                  encoder_hidden_states=torch.randn(2, 154, 256, device=device),
                  pooled_projections=torch.randn(2, 128, device=device), timestep=torch.tensor([500.0, 500.0]),
                  return_dict=False)
    dense = timed(lambda: transformer(**inputs), repeats)
    with mmattn.apply(pipe, mmattn.WindowAttention(Window2D(kernel))):
        windowed_s = timed(lambda: transformer(**inputs), repeats)
    tokens = (latent // 2) ** 2
    row = {"model": f"SD3 transformer, {layers} layers, {heads} heads x {head_dim}, sample size {latent // 2}",
           "latent": latent, "image_tokens": tokens, "text_tokens": 154, "kernel": kernel,
           "element_density": round(kernel * kernel / tokens, 4), "batch": 2, "dense_s": dense,
           "windowed_s": windowed_s, "speedup": round(dense / windowed_s, 2)}
    print(json.dumps(row))
    return row


def _odd(x: float) -> int:
    """An odd kernel size near ``x``: ``x`` rounded to an even number, plus one."""
    return 2 * round(x / 2) + 1


class _PipeShell:
    """The least of a pipeline that ``mmattn.apply`` needs for a bare transformer: its ``transformer`` and a
    scheduler without timesteps (every call counts as step 0 of 1)."""

    def __init__(self, transformer):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.transformer, self.scheduler = transformer, FlowMatchEulerDiscreteScheduler()

    def __call__(self, *args, **kwargs):
        raise NotImplementedError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sides", type=int, nargs="+", default=[128, 256], help="grid sides: side^2 tokens")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flex-max-tokens", type=int, default=16384,
                        help="FlexAttention only up to this many tokens (its CPU block-mask build and compile are slow)")
    parser.add_argument("--sd3-latents", type=int, nargs="+", default=[128, 256],
                        help="latent sides of the SD3 calls (each 2x its model's sample size)")
    parser.add_argument("--sd3-density", type=float, default=0.04, help="the SD3 windows' share of the token grid")
    parser.add_argument("--out", default="bench/results/windows_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"date": date.today().isoformat(), "machine": platform.platform(), "device": device,
              "gpu": torch.cuda.get_device_name() if device == "cuda" else None, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                                   capture_output=True, text=True).stdout.strip(),
              "attention": attention_rows(args.sides, args.heads, args.head_dim, args.repeats, device,
                                          args.flex_max_tokens),
              "sd3_steps": [denoiser_row(6, 8, 64, latent, _odd(math.sqrt(args.sd3_density) * latent / 2), args.repeats,
                                         device) for latent in args.sd3_latents]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
