"""Benchmark: prefill time and peak memory of VAR (visual attention redistribution) on CPU.

The mid-size LLaVA-1.5-style model of ``bench_pruning.py`` (random weights, 16 layers, hidden 1024, 576 image
tokens per image + 64 text tokens), one prompt with 1 and with 4 images, fp32, side by side in one run:

* ``baseline``: the unmodified model (SDPA);
* ``var``: mmattn's VAR in the fused path (three key groups under one running max, reweighted per row);
* ``eager_var``: VAR as the official code runs it: eager attention (every layer's N x N probabilities
  materialised) with the redistribution applied to them, on the same sinks.

Random weights have no massive activations, so the sinks come from a low threshold on two fixed dims
(``tau=2.5, sink_dims=(0, 1)``): a few percent of the tokens, enough rows image-centric to redistribute. Times:
median over ``--repeats`` interleaved rounds after a warm-up; peak memory: the largest RSS increase during one
prefill of each case (``bench_pruning.measure``: RSS sampled every 2 ms).

    .venv/bin/python bench/bench_sinks.py --out bench/results/sinks_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from datetime import date
from pathlib import Path

import torch

import mmattn
from mmattn._compat import AttentionInterface, AttentionMaskInterface, eager_attention_forward, eager_mask
from mmattn.processors import sinks

from bench_pruning import build_model, make_inputs, measure, model_arguments

EAGER_VAR = "bench_eager_var"
CONFIG = mmattn.VAR(tau=2.5, sink_dims=(0, 1), rho=0.9, image_mass=0.05)
CASES = ("baseline", "var", "eager_var")
_STATE: dict = {}


def _eager_var_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Eager attention, then the official redistribution on the materialised probabilities (batch of one)."""
    kwargs.pop("dropout", None)
    _, probs = eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    state = _STATE["state"]
    index, c = module.layer_idx, CONFIG
    if index in state.phi:
        sink, image = (t[0] for t in state.sinks(index, key.shape[2], query.device))
        visual = sink & image
        if visual.any():
            first = int(image.nonzero().max()) + 1 if state.prefill else 0
            a = probs[0, :, first:].float()
            portion = a[..., visual].sum(-1) / (a[..., image] + 1e-6).sum(-1)
            chosen = (portion <= c.rho) & (a[..., image].sum(-1) >= c.image_mass)
            budget = (1 - c.p) * a[..., sink].sum(-1)
            ratios = torch.where(visual, 0.0, a) * image
            new = a.clone()
            new[..., sink] *= c.p
            new = new + budget[..., None] * ratios / ratios.sum(-1, keepdim=True)
            probs[0, :, first:] = torch.where(chosen[..., None], new, a).to(probs.dtype)
    groups = query.shape[1] // key.shape[1]
    out = probs @ value.repeat_interleave(groups, dim=1)
    return out.transpose(1, 2).contiguous(), probs


def _prefill(model, inputs):
    with torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)


class _Case:
    def __init__(self, model, name):
        self.model, self.name, self.handle = model, name, None

    def __enter__(self):
        if self.name != "baseline":
            self.handle = mmattn.apply(self.model, CONFIG)
            _STATE["state"] = next(op.state for layer in self.model.model.language_model.layers
                                   for op in mmattn.text_attention._OPS.get(layer.self_attn, ())
                                   if isinstance(op, sinks.VisualSinkRedistribution))
            if self.name == "eager_var":
                self.model.set_attn_implementation({"text_config": EAGER_VAR})
        return self

    def __exit__(self, *exc):
        if self.name == "eager_var":
            self.model.set_attn_implementation({"text_config": mmattn.text_attention.IMPLEMENTATION})
        if self.handle is not None:
            self.handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/sinks_cpu.json")
    args = parser.parse_args()
    AttentionInterface.register(EAGER_VAR, _eager_var_attention)
    AttentionMaskInterface.register(EAGER_VAR, eager_mask)
    torch.manual_seed(0)
    model = build_model(args.layers, args.hidden, args.heads, args.kv_heads)
    rows = []
    for images in args.images:
        inputs = make_inputs(args.text_tokens, images)
        times = {case: [] for case in CASES}
        peaks = {case: 0 for case in CASES}
        for round_ in range(args.repeats + 1):
            for case in CASES:
                with _Case(model, case):
                    seconds, peak = measure(lambda: _prefill(model, inputs))
                    if round_:
                        times[case].append(seconds)
                        peaks[case] = max(peaks[case], peak)
        with _Case(model, "var"):
            _prefill(model, inputs)
            stats = sinks.last_sink_stats(model)
        row = {"images": images, "tokens": int(inputs["input_ids"].shape[1]),
               **{f"{case}_s": statistics.median(times[case]) for case in CASES},
               "visual_sinks": sum(layer.visual_sinks for layer in stats.layers),
               "rows_redistributed": sum(layer.rows for layer in stats.layers)}
        row.update({f"{case}_peak_rss_increase_mb": round(peaks[case] / 2**20) for case in CASES})
        row["var_vs_baseline"] = round(row["var_s"] / row["baseline_s"], 2)
        row["eager_vs_var"] = round(row["eager_var_s"] / row["var_s"], 2)
        print(json.dumps(row))
        rows.append(row)
    result = {"date": date.today().isoformat(), "machine": platform.platform(), "threads": torch.get_num_threads(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "model": f"LLaVA-style, {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
                       f"({args.kv_heads} KV), random weights", "config": CONFIG.to_dict(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
