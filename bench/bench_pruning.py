"""Benchmark: prefill time and peak memory of visual token pruning (FastV and the other scorers) on CPU.

A mid-size LLaVA-1.5-style model with random weights, built in code (LlavaForConditionalGeneration: a small
CLIP tower, 336 px images -> 576 image tokens; a Llama text model of 16 layers, hidden 1024, 16 heads, 4 KV
heads), one prompt of 576 image tokens + 64 text tokens, fp32. One prefill (forward with a fresh cache, logits
of the last token) per case, the cases interleaved round by round so machine noise hits them alike:

* ``baseline``: no pruning (SDPA);
* ``fastv``: mmattn's FastV(layer=2, keep=k): fused SDPA everywhere, the scoring row from the saved LSE;
* ``eager_fastv``: research-code FastV emulated in one pass: the text model on eager attention (the
  full attention matrix of every layer materialised, as ``output_attentions`` needs), the last row of layer
  K-1's matrix ranks the image tokens, layers >= K run on the kept tokens (eager);
* ``eager_fastv_2pass``: as research code that reads ``output_attentions``: a full eager prefill returning
  every layer's attention matrix, then the pruned eager prefill above;
* ``sparsevlm`` (SparseVLM(layer=2)), ``divprune`` (DivPrune(), before the LLM) and ``visionzip``
  (VisionZip(), [CLS] attention of the tower's feature layer, before the LLM): mmattn's other scorers at the
  same budgets.

keep = 33% / 22% / 11% of the 576 image tokens (192 / 128 / 64, the standard table). Times: median over
``--repeats`` rounds after a warm-up round. Peak memory: measured in a child process (one prefill per case),
the peak process RSS (read from /proc/self/statm by a thread sampling every 2 ms) minus the RSS just before
the prefill; the child runs with ``MALLOC_MMAP_THRESHOLD_`` fixed so that freed tensors go back to the OS and
each case's delta is its own (that setting makes every large allocation page-fault, so no timing is taken there).

    .venv/bin/python bench/bench_pruning.py --out bench/results/pruning_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AttentionInterface,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import mmattn  # noqa: E402
from mmattn import DivPrune, FastV, SparseVLM, VisionZip  # noqa: E402
from mmattn._compat import AttentionMaskInterface, eager_attention_forward, eager_mask  # noqa: E402
from mmattn.processors import pruning  # noqa: E402

EAGER_FASTV = "bench_eager_fastv"
IMAGE_TOKEN_ID = 1999
PAGE = os.sysconf("SC_PAGE_SIZE")
_EAGER_CHOICE: dict = {}  # the image tokens the last eager_fastv prefill kept
OTHERS = {"sparsevlm": lambda keep: SparseVLM(layer=2, keep=keep), "divprune": lambda keep: DivPrune(keep=keep),
          "visionzip": lambda keep: VisionZip(keep=keep)}


def build_model(layers: int, hidden: int, heads: int, kv_heads: int) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=64)
    text = LlamaConfig(vocab_size=2000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                         image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         attn_implementation="sdpa")
    return LlavaForConditionalGeneration(config).eval()


def make_inputs(text_tokens: int, images: int) -> dict:
    """<bos> + 8 system tokens + 576 image tokens per image + the rest of the text (LLaVA-1.5's layout)."""
    generator = torch.Generator().manual_seed(0)
    before, after = 9, text_tokens - 9
    text = torch.randint(3, 1900, (text_tokens,), generator=generator)
    ids = torch.cat([text[:before], torch.full((576 * images,), IMAGE_TOKEN_ID), text[before:before + after]])[None]
    pixels = torch.randn(images, 3, 336, 336, generator=generator)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)


def _eager_fastv_attention(module, query, key, value, attention_mask, **kwargs):
    """Research-code FastV: eager attention; in the scoring layer, the materialised matrix's last row ranks."""
    output, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
    state = pruning._SCORING_LAYERS.get(module)
    if state is not None and state.selecting:  # batch of one, no padding
        state.selecting = False
        scores = weights[0, :, -1].float().mean(dim=0)
        image_mask = state.image_mask[0]
        image_positions = image_mask.nonzero().squeeze(1)
        keep = state.config.keep
        budget = min(keep if isinstance(keep, int) else round(keep * len(image_positions)), len(image_positions))
        chosen = pruning.top_image_tokens(scores[image_positions][None], image_positions[None], budget)
        _EAGER_CHOICE["kept"] = chosen
        state.kept = torch.cat([(~image_mask).nonzero().squeeze(1)[None], chosen], dim=1).sort(dim=1).values
    return output, weights


@contextmanager
def fastv(model, keep: float, eager: bool):
    handle = mmattn.apply(model, FastV(layer=2, keep=keep))
    if eager:
        model.set_attn_implementation({"text_config": EAGER_FASTV})
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def eager_text(model):
    model.set_attn_implementation({"text_config": "eager"})
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def measure(fn) -> tuple[float, int]:
    """Seconds and peak RSS increase (bytes) of one call of ``fn``."""
    start_rss, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return seconds, max(peak[0], rss()) - start_rss


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The mid-size model's flags (``build_model``'s arguments and the prompt's text tokens), shared by bench_sinks."""
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--text-tokens", type=int, default=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--keeps", type=int, nargs="+", default=[192, 128, 64],
                        help="image tokens kept (of 576 per image): 33%% / 22%% / 11%% of one image")
    parser.add_argument("--images", type=int, default=1, help="images in the prompt (576 tokens each)")
    parser.add_argument("--kinds", nargs="+", default=["fastv", "eager_fastv", "eager_fastv_2pass", *OTHERS],
                        help="pruned cases to run (baseline always runs)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--out", default="bench/results/pruning_cpu.json")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    AttentionInterface.register(EAGER_FASTV, _eager_fastv_attention)
    AttentionMaskInterface.register(EAGER_FASTV, eager_mask)

    model = build_model(args.layers, args.hidden, args.heads, args.kv_heads)
    inputs = make_inputs(args.text_tokens, args.images)
    n_image = 576 * args.images

    def prefill(**extra):
        return model(**inputs, use_cache=True, logits_to_keep=1, **extra)

    def case(keep: float | None, kind: str):
        def run():
            if kind == "baseline":
                prefill()
            elif kind == "fastv":
                with fastv(model, keep, eager=False):
                    prefill()
            elif kind == "eager_fastv":
                with fastv(model, keep, eager=True):
                    prefill()
            elif kind in OTHERS:
                with mmattn.apply(model, OTHERS[kind](keep)):
                    prefill()
            else:  # eager_fastv_2pass
                with eager_text(model):
                    attentions = prefill(output_attentions=True).attentions
                del attentions
                with fastv(model, keep, eager=True):
                    prefill()
        return run

    cases = {"baseline": case(None, "baseline")}
    for keep in args.keeps:
        for kind in args.kinds:
            cases[f"{kind}@{keep}"] = case(keep, kind)

    if args.memory_child:  # one prefill per case; print {case: peak RSS delta in bytes}
        case(None, "baseline")()
        print(json.dumps({name: measure(fn)[1] for name, fn in cases.items()}))
        return

    # the pruned prefills keep what they should
    with fastv(model, args.keeps[0], eager=False):
        prefill()
    kept_ours = pruning.last_stats(model).kept_image_positions
    with fastv(model, args.keeps[0], eager=True):
        prefill()
    kept_eager = _EAGER_CHOICE["kept"]
    agreement = len(set(kept_ours[0].tolist()) & set(kept_eager[0].tolist())) / kept_ours.shape[1]

    load = os.getloadavg()[0]
    seconds = {name: [] for name in cases}
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            if round_:
                seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    best = {name: min(v) for name, v in seconds.items()}
    child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--memory-child"], capture_output=True, text=True,
                           env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}, check=True)
    peak_mib = {name: value / 2**20 for name, value in json.loads(child.stdout.strip().splitlines()[-1]).items()}

    n = inputs["input_ids"].shape[1]
    rows, ratios = [], {}
    print(f"{n} tokens ({n_image} image), {args.layers} layers, hidden {args.hidden}, {torch.get_num_threads()} threads")
    print(f"{'case':<26}{'kept img':>9}{'median s':>10}{'vs base':>9}{'min s':>8}{'vs base':>9}{'peak MiB':>10}")
    for name in cases:
        kept = n_image if name == "baseline" else int(name.split("@")[1])
        speedup, speedup_min = median["baseline"] / median[name], best["baseline"] / best[name]
        rows.append({"case": name, "kept_image_tokens": kept, "prefill_s_median": median[name],
                     "prefill_s_min": best[name], "speedup_vs_baseline_median": speedup,
                     "speedup_vs_baseline_min": speedup_min, "peak_rss_delta_mib": peak_mib[name],
                     "samples_s": seconds[name]})
        print(f"{name:<26}{kept:>9}{median[name]:>10.3f}{speedup:>8.2f}x{best[name]:>8.3f}{speedup_min:>8.2f}x"
              f"{peak_mib[name]:>10.1f}")
    for keep in args.keeps:
        tag = str(keep)
        for stat, values in (("median", median), ("min", best)):
            ratio = {f"{kind}_vs_baseline": values["baseline"] / values[f"{kind}@{tag}"] for kind in args.kinds
                     if not kind.startswith("eager")}
            ratio.update({f"fastv_vs_{kind}": values[f"{kind}@{tag}"] / values[f"fastv@{tag}"] for kind in args.kinds
                          if kind.startswith("eager") and "fastv" in args.kinds})
            ratios.setdefault(f"keep {keep} ({keep / n_image:.0%})", {})[stat] = ratio
    print("speedups (x, median | min):")
    for tag, r in ratios.items():
        print(f"  {tag}: " + ", ".join(f"{k} {v:.2f} | {r['min'][k]:.2f}" for k, v in r["median"].items()))
    print(f"kept image tokens shared by fastv and eager_fastv at keep {args.keeps[0]}: {agreement:.1%}")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"{torch.get_num_threads()} torch threads, load {load:.2f} at start",
        "torch": torch.__version__, "commit": commit + ("-dirty" if dirty else ""),
        "model": {"class": "LlavaForConditionalGeneration", "text": f"Llama {args.layers} layers, hidden {args.hidden}, "
                  f"{args.heads} heads, {args.kv_heads} kv heads", "vision": "CLIP 2 layers, hidden 64, 336 px / 14",
                  "tokens": n, "image_tokens": n_image, "dtype": "float32", "fastv_layer": 2},
        "memory": "peak process RSS during one prefill minus RSS before it (/proc/self/statm sampled every 2 ms, "
                  "in a child process run with MALLOC_MMAP_THRESHOLD_=131072)",
        "repeats": args.repeats, "rows": rows, "speedups": ratios,
        "kept_agreement_fastv_vs_eager": agreement,
        "targets": {"fastv_vs_baseline at keep 25%": ">= 2", "fastv_vs_eager_fastv": ">= 1.5"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
