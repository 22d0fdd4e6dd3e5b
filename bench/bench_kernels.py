"""Benchmark mmattn.kernels against torch SDPA and FlexAttention, dense and windowed.

    python bench/bench_kernels.py --device cpu --out bench/results/kernels_cpu.json
    python bench/bench_kernels.py --device cuda --out bench/results/kernels_cuda.json

CPU: the chunked CPU path vs SDPA and FlexAttention (compiled, when it runs), N = 4096 and 16384, H = 8, D = 64,
fp32. CUDA: TFLOP/s of the Triton kernel vs SDPA (flash) and FlexAttention, N = 4k..64k, fp16 and bf16, plus
grouped_attention (4 groups) vs plain. "windowed" is a 1D window sized to ~5% block density. Writes JSON and a
Markdown table beside it (same name, .md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mmattn.kernels as K
from mmattn.kernels import BlockMask


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    """Median seconds over ``repeats`` runs after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def window_for_density(n, density, block_q, block_kv):
    """Half-width w of the 1D window |i - j| <= w whose block layout has about ``density``."""
    return max(1, int(density * n / 2) - (block_q + block_kv) // 2)


def flex_fns(device):
    """(compiled flex_attention, create_block_mask) or None with the reason when unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        return torch.compile(flex_attention, dynamic=False), create_block_mask
    except Exception as error:  # noqa: BLE001 - report any failure to set up
        return None, repr(error)


def run_case(results, name, n, fn, device, repeats, flops):
    try:
        seconds = timed(fn, device, repeats)
        row = dict(case=name, n=n, seconds=seconds, tflops=flops / seconds / 1e12)
    except Exception as error:  # noqa: BLE001 - a competitor that does not run is a result, not a crash
        row = dict(case=name, n=n, error=repr(error)[:200])
    results.append(row)
    print(json.dumps(row), flush=True)


def bench(device, sizes, dtypes, heads, dim, repeats, density):
    results = []
    flex, create_block_mask = flex_fns(device)
    for dtype in dtypes:
        for n in sizes:
            q, k, v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype) for _ in range(3))
            dense_flops = 4 * heads * n * n * dim
            tag = str(dtype).replace("torch.", "")
            bq, bk = 128, 64
            w = window_for_density(n, density, bq, bk)
            bm = BlockMask.from_mask_mod(lambda b, h, i, j: (i - j).abs() <= w, None, None, n, n, bq, bk, device)
            win_flops = dense_flops * bm.density
            cases = [
                ("sdpa dense", lambda: F.scaled_dot_product_attention(q, k, v), dense_flops),
                ("mmattn dense", lambda: K.attention(q, k, v), dense_flops),
                ("sdpa causal", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), dense_flops / 2),
                ("mmattn causal", lambda: K.attention(q, k, v, causal=True), dense_flops / 2),
                (f"mmattn windowed ({bm.density:.1%})", lambda: K.attention(q, k, v, block_mask=bm), win_flops),
            ]
            if device == "cuda":
                gid = torch.randint(0, 4, (1, n), device=device)
                cases.append(("mmattn grouped x4 dense",
                              lambda: K.grouped_attention(q, k, v, gid, num_groups=4), dense_flops))
            if flex is not None:
                flex_bm = create_block_mask(lambda b, h, i, j: (i - j).abs() <= w, None, None, n, n, device=device)
                cases += [("flex dense", lambda: flex(q, k, v), dense_flops),
                          (f"flex windowed ({flex_bm.sparsity() / -100 + 1:.1%})",
                           lambda: flex(q, k, v, block_mask=flex_bm), win_flops)]
            for name, fn, flops in cases:
                run_case(results, f"{name} {tag}", n, fn, device, repeats, flops)
    if flex is None:
        results.append(dict(case="flex", error=create_block_mask))
    return results


def machine(device):
    info = dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                torch_threads=torch.get_num_threads(), load_average=os.getloadavg())
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def git_commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, cwd=Path(__file__).parent).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def table(results):
    lines = ["| case | N | ms | TFLOP/s |", "|---|---|---|---|"]
    for r in results:
        if "seconds" in r:
            lines.append(f"| {r['case']} | {r['n']} | {r['seconds'] * 1e3:.1f} | {r['tflops']:.3f} |")
        else:
            lines.append(f"| {r['case']} | {r.get('n', '')} | error: {r['error'][:80]} | |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); 1 avoids OpenMP stalls when shared")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    sizes = args.sizes or ([4096, 8192, 16384, 32768, 65536] if cuda else [4096, 16384])
    dtypes = [torch.float16, torch.bfloat16] if cuda else [torch.float32]
    heads = args.heads or (16 if cuda else 8)
    results = bench(args.device, sizes, dtypes, heads, args.dim, args.repeats or (10 if cuda else 2), args.density)
    report = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=machine(args.device), torch=torch.__version__, git_commit=git_commit(),
                  config=dict(sizes=sizes, heads=heads, dim=args.dim, batch=1, density=args.density),
                  results=results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    markdown = table(results)
    args.out.with_suffix(".md").write_text(
        f"# mmattn kernels, {args.device}\n\n{report['date']}, torch {report['torch']}, commit {report['git_commit']}, "
        f"machine {json.dumps(report['machine'])}\n\n{markdown}\n")
    print(markdown)


if __name__ == "__main__":
    main()
