"""Window attention: NATTEN's semantics, the brute-force mask, and the method on every diffusion family."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

import mmattn
from mmattn import Window1D, Window2D, Window3D, WindowAttention, methods, window_attention
from mmattn.adapters import diffusion_family
from mmattn.hub import pipeline_defaults
from mmattn.testing import build_tiny
from mmattn.windows import plan, tile_order

NATTEN_CASES = [
    (Window1D, (13,), dict(kernel_size=5)),
    (Window1D, (13,), dict(kernel_size=4)),
    (Window1D, (13,), dict(kernel_size=4, causal=True)),
    (Window1D, (17,), dict(kernel_size=5, dilation=3)),
    (Window1D, (17,), dict(kernel_size=5, stride=3)),
    (Window1D, (17,), dict(kernel_size=6, stride=4, dilation=2, causal=True)),
    (Window2D, (7, 9), dict(kernel_size=(3, 5), dilation=(2, 1), stride=(1, 2))),
    (Window2D, (11, 6), dict(kernel_size=(4, 3), causal=(True, False), stride=(2, 3))),
    (Window2D, (9, 9), dict(kernel_size=9)),
    (Window3D, (3, 5, 7), dict(kernel_size=(2, 3, 3), stride=(1, 2, 1), dilation=(1, 1, 2))),
    (Window3D, (4, 3, 5), dict(kernel_size=(3, 2, 5), causal=(True, False, False))),
]


@pytest.mark.parametrize("cls,grid,settings", NATTEN_CASES)
def test_equals_natten(cls, grid, settings):
    natten = pytest.importorskip("natten")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, *grid, 2, 8) for _ in range(3))
    function = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[cls.ndim]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # natten's CPU (Flex, uncompiled) backend warns about speed
        expected = function(q, k, v, kernel_size=settings["kernel_size"], stride=settings.get("stride", 1),
                            dilation=settings.get("dilation", 1), is_causal=settings.get("causal", False))
    torch.testing.assert_close(window_attention(q, k, v, cls(**settings)), expected, atol=1e-5, rtol=1e-5)


def test_additional_keys_equal_natten():
    natten = pytest.importorskip("natten")
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 7, 9, 2, 8) for _ in range(3))
    extra_k, extra_v = torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = natten.na2d(q, k, v, kernel_size=(3, 5), additional_keys=extra_k, additional_values=extra_v)
    out = window_attention(q, k, v, Window2D((3, 5)), additional_keys=extra_k, additional_values=extra_v)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def brute_force_visible(spec, grid):
    """(N, N) visibility written from the rule: per axis, a query's window of kernel_size group coordinates
    starts at its stride leader minus kernel // 2, pushed inside the group; causal: the keys up to the query
    within kernel - 1 of its leader."""
    coords = list(itertools.product(*(range(n) for n in grid)))
    mask = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, qc in enumerate(coords):
        for j, kc in enumerate(coords):
            ok = True
            for axis, (n, kernel, d, s, causal) in enumerate(zip(grid, spec.kernel_size, spec.dilation, spec.stride,
                                                              spec.causal)):
                if qc[axis] % d != kc[axis] % d:
                    ok = False
                    break
                size = len(range(qc[axis] % d, n, d))
                iq, ik = qc[axis] // d, kc[axis] // d
                if causal:
                    leader = min(iq - iq % s + s - 1, size - 1)
                    ok &= ik <= iq and leader - ik < kernel
                else:
                    leader = min(iq - iq % s + s // 2, size - 1)
                    first = min(max(leader - kernel // 2, 0), size - kernel)
                    ok &= first <= ik < first + kernel
            mask[i, j] = ok
    return mask


@pytest.mark.parametrize("cls,grid,settings", NATTEN_CASES[:9])
def test_mask_equals_brute_force(cls, grid, settings):
    spec = cls(**settings)
    p = plan(spec, grid)
    dense = p.mask.to_dense()[0, 0]
    # back from the tiled order to row-major: entry (order[i], order[j]) of the row-major mask
    unpermuted = torch.zeros_like(dense)
    unpermuted[p.order[:, None], p.order[None, :]] = dense
    assert torch.equal(unpermuted, brute_force_visible(spec, grid))


def test_text_tokens_global_and_separate():
    spec, grid = Window2D(3), (5, 6)
    n = 30
    for text, before, after in (("global", 4, 0), ("separate", 0, 3)):
        p = plan(spec, grid, before=before, after=after, text=text)
        dense = torch.zeros(n + before + after, n + before + after, dtype=torch.bool)
        dense[p.order[:, None], p.order[None, :]] = p.mask.to_dense()[0, 0]
        image = torch.zeros(len(dense), dtype=torch.bool)
        image[before:before + n] = True
        window = dense[image][:, image]
        assert torch.equal(window, brute_force_visible(spec, grid))
        if text == "global":
            assert dense[~image].all() and dense[:, ~image].all()
        else:
            assert dense[~image][:, ~image].all() and not dense[~image][:, image].any()
            assert not dense[image][:, ~image].any()


def test_tile_order_is_a_permutation_with_whole_tiles_first():
    order = tile_order((10, 13))
    assert sorted(order.tolist()) == list(range(130))
    first_tile = order[:64]
    rows, cols = first_tile // 13, first_tile % 13
    assert rows.max() < 8 and cols.max() < 8


@pytest.mark.parametrize("kwargs,message", [
    (dict(kernel_size=0), "kernel_size=0"),
    (dict(kernel_size=3, stride=4), "stride=4 is out of range"),
    (dict(kernel_size=(3, 3, 3)), "one value or 2"),
    (dict(kernel_size=3.0), "expected integers"),
])
def test_spec_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Window2D(**kwargs)


def test_window_larger_than_grid_names_the_axis():
    with pytest.raises(ValueError, match="axis 1: kernel_size 5 x dilation 2 = 10 exceeds the grid's extent 9"):
        plan(Window2D(5, dilation=(1, 2)), (12, 9))


WHOLE_GRID = {  # family: (model, window covering each selected layer's whole grid, layers)
    "sd": ("tiny/sd", Window2D(8), "down_blocks.1.attentions.0.transformer_blocks.0;"
                                    "mid_block.attentions.0.transformer_blocks.0"),
    "sdxl": ("tiny/sdxl", Window2D(8), "*"),
    "sd3": ("tiny/sd3", Window2D(8), "*"),
    "flux": ("tiny/flux", Window2D(8), "*"),
    "pixart": ("tiny/pixart", Window2D(8), "*"),
    "wan": ("tiny/wan", Window3D((3, 4, 4)), "*"),
    "cogvideox": ("tiny/cogvideox", Window3D((3, 8, 8)), "*"),
    "ltx": ("tiny/ltx", Window3D((3, 8, 8)), "*"),
    "hunyuandit": ("tiny/hunyuandit", Window2D(4), "*"),
}


def _run(pipe, name, prompt="a red circle", seeds=(0,), **call):
    generator = [torch.Generator().manual_seed(s) for s in seeds] if len(seeds) > 1 else \
        torch.Generator().manual_seed(seeds[0])
    out = pipe(prompt, generator=generator, output_type="pt", **{**pipeline_defaults(name), **call})
    return out.frames if hasattr(out, "frames") else out.images


@pytest.mark.parametrize("family", list(WHOLE_GRID))
def test_whole_grid_window_equals_dense_and_remove_restores(family):
    name, window, layers = WHOLE_GRID[family]
    pipe = build_tiny(name)
    baseline = _run(pipe, name)
    handle = mmattn.apply(pipe, WindowAttention(window, layers=layers))
    windowed = _run(pipe, name)
    handle.remove()
    torch.testing.assert_close(windowed, baseline, atol=2e-5, rtol=1e-4)
    assert torch.equal(_run(pipe, name), baseline)
    attention = diffusion_family(pipe).attention_layers(diffusion_family(pipe).denoiser(pipe))
    assert all(type(a.processor).__module__.startswith("diffusers") for a in attention.values())


@pytest.mark.parametrize("name,window,call", [
    ("tiny/sd3", Window2D(5), dict(height=64, width=64)),
    ("tiny/flux", Window2D(5), dict(height=64, width=64)),
    ("tiny/wan", Window3D((3, 5, 5)), dict(height=64, width=64, num_frames=17)),
    ("tiny/cogvideox", Window3D((3, 5, 5)), dict(height=64, width=64, num_frames=9)),
    ("tiny/ltx", Window3D((3, 5, 5)), dict(height=64, width=64, num_frames=17)),
    ("tiny/hunyuandit", Window2D(5), dict(height=128, width=128)),
])
def test_twice_the_resolution_windowed(name, window, call):
    pipe = build_tiny(name)
    dense = _run(pipe, name, **call)
    with mmattn.apply(pipe, WindowAttention(window)):
        out = _run(pipe, name, **call)
    assert out.shape == dense.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, dense, atol=1e-4)  # the windows did restrict attention


def test_batch_equals_each_sample_alone():
    pipe = build_tiny("tiny/sd3")
    prompts = ["a red circle", "a blue square"]
    with mmattn.apply(pipe, WindowAttention(Window2D(3), text="separate")):
        batch = _run(pipe, "tiny/sd3", prompt=prompts, seeds=(0, 1))
        alone = torch.cat([_run(pipe, "tiny/sd3", prompt=[p], seeds=(s,)) for s, p in enumerate(prompts)])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


def test_steps_outside_the_window_are_dense():
    pipe = build_tiny("tiny/sd3")
    baseline = _run(pipe, "tiny/sd3")
    with mmattn.apply(pipe, WindowAttention(Window2D(3), steps=(0.0, 0.0))):
        assert torch.equal(_run(pipe, "tiny/sd3"), baseline)
    with mmattn.apply(pipe, WindowAttention(Window2D(3), steps=(0.5, 1.0))):
        late = _run(pipe, "tiny/sd3")
    with mmattn.apply(pipe, WindowAttention(Window2D(3))):
        always = _run(pipe, "tiny/sd3")
    assert not torch.equal(late, baseline) and not torch.allclose(late, always)


def test_composes_with_perturbation_on_the_same_layer():
    pipe = build_tiny("tiny/sd3")
    pag = mmattn.PAG(heads="transformer_blocks.1:*", scale=2.0)
    with mmattn.apply(pipe, pag):
        expected = _run(pipe, "tiny/sd3")
    with mmattn.apply(pipe, [pag, WindowAttention(Window2D(8))]):
        both = _run(pipe, "tiny/sd3")
    torch.testing.assert_close(both, expected, atol=2e-5, rtol=1e-4)
    with mmattn.apply(pipe, [WindowAttention(Window2D(3)), pag]):
        small = _run(pipe, "tiny/sd3")
    assert not torch.allclose(small, expected, atol=1e-4)


def test_entropy_scaling_at_training_size_changes_nothing():
    pipe = build_tiny("tiny/sd3")
    with mmattn.apply(pipe, WindowAttention(Window2D(8))):
        plain = _run(pipe, "tiny/sd3")
    with mmattn.apply(pipe, WindowAttention(Window2D(8), entropy_scaling=True, training_tokens=64)):
        scaled = _run(pipe, "tiny/sd3")
    torch.testing.assert_close(scaled, plain, atol=1e-6, rtol=1e-6)  # log N / log T = 1
    with mmattn.apply(pipe, WindowAttention(Window2D(8), entropy_scaling=True, training_tokens=16)):
        assert not torch.allclose(_run(pipe, "tiny/sd3"), plain, atol=1e-4)


def test_bad_input_errors():
    pipe = build_tiny("tiny/sd3")
    with pytest.raises(ValueError, match="needs a Window2D; got Window3D"):
        mmattn.apply(pipe, WindowAttention(Window3D(3)))
    with pytest.raises(ValueError, match="no attention layer named 'blocks.0'"):
        mmattn.apply(pipe, WindowAttention(Window2D(3), layers="blocks.0"))
    with mmattn.apply(pipe, WindowAttention(Window2D(9))):
        with pytest.raises(ValueError, match="kernel_size 9 x dilation 1 = 9 exceeds the grid's extent 8"):
            _run(pipe, "tiny/sd3")
    with mmattn.apply(pipe, WindowAttention(Window2D(3))):
        with pytest.raises(ValueError, match="already has a window method"):
            mmattn.apply(pipe, WindowAttention(Window2D(5)))
    wan = build_tiny("tiny/wan")
    with pytest.raises(ValueError, match="needs a Window3D; got Window2D"):
        mmattn.apply(wan, WindowAttention(Window2D(3)))


def test_config_round_trip():
    config = WindowAttention(Window3D((3, 5, 5), dilation=(1, 2, 2), causal=(True, False, False)), layers="blocks.0",
                             steps=(0.2, 1.0), entropy_scaling=True, training_tokens=256)
    assert methods.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="steps="):
        WindowAttention(Window2D(3), steps=(0.5,))
    with pytest.raises(ValueError, match="text='both'"):
        WindowAttention(Window2D(3), text="both")


def test_sliding_tiles_mask_equals_brute_force_and_visits_full_blocks():
    from mmattn.windows import SlidingTiles

    spec, grid = SlidingTiles(tile=(8, 8), window=(3, 3)), (40, 48)
    p = plan(spec, grid)
    dense = torch.zeros(40 * 48, 40 * 48, dtype=torch.bool)
    dense[p.order[:, None], p.order[None, :]] = p.mask.to_dense()[0, 0]
    rows, cols = torch.arange(40 * 48) // 48, torch.arange(40 * 48) % 48
    tr, tc = rows // 8, cols // 8

    def window_start(t, count, w=3):
        return (t - w // 2).clamp(0, count - w)

    sr, sc = window_start(tr, 5), window_start(tc, 6)
    expected = ((tr[None, :] >= sr[:, None]) & (tr[None, :] < sr[:, None] + 3)
                & (tc[None, :] >= sc[:, None]) & (tc[None, :] < sc[:, None] + 3))
    assert torch.equal(dense, expected)
    assert int(p.mask.partial_counts.max()) == 0  # 8 x 8 tiles are the 64-token blocks: every block is full


def test_radial_mask_equals_brute_force():
    from mmattn.windows import Radial

    spec, grid = Radial(dense_frames=1), (9, 3, 4)
    p = plan(spec, grid)
    n = 9 * 12
    dense = torch.zeros(n, n, dtype=torch.bool)
    dense[p.order[:, None], p.order[None, :]] = p.mask.to_dense()[0, 0]
    expected = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            dt, ds = abs(i // 12 - j // 12), abs(i % 12 - j % 12)
            width = 12 if dt <= 1 else 12 / 2 ** int(math.floor(math.log2(dt)))
            expected[i, j] = dt <= 1 or j // 12 == 0 or ds < width / 2
    assert torch.equal(dense, expected)


def test_radial_and_sliding_tiles_on_wan_and_sd3():
    from mmattn.windows import Radial, SlidingTiles

    wan = build_tiny("tiny/wan")
    call = dict(height=64, width=64, num_frames=17)
    dense = _run(wan, "tiny/wan", **call)
    with mmattn.apply(wan, WindowAttention(Radial())):
        radial = _run(wan, "tiny/wan", **call)
    assert torch.isfinite(radial).all() and not torch.allclose(radial, dense, atol=1e-4)
    sd3 = build_tiny("tiny/sd3")
    with mmattn.apply(sd3, WindowAttention(SlidingTiles(tile=(4, 4), window=(1, 1)))):
        tiles = _run(sd3, "tiny/sd3", height=64, width=64)
    assert torch.isfinite(tiles).all()
    config = WindowAttention(SlidingTiles(tile=(2, 4, 4), window=(1, 3, 3)))
    assert methods.from_dict(config.to_dict()) == config
    assert methods.from_dict(WindowAttention(Radial(dense_frames=2)).to_dict()).window == Radial(dense_frames=2)


TRAINING_GRIDS = {"tiny/sd3": (1, 8, 8), "tiny/flux": (1, 8, 8), "tiny/wan": (3, 4, 4), "tiny/pixart": (1, 8, 8)}


@pytest.mark.parametrize("name", list(TRAINING_GRIDS))
def test_freeswim_at_the_training_size_is_dense(name):
    pipe = build_tiny(name)
    baseline = _run(pipe, name)
    unscaled = dict(training_grid=TRAINING_GRIDS[name], entropy_scaling=False)
    with mmattn.apply(pipe, mmattn.FreeSwim(**unscaled, dual_path="off")):
        same = _run(pipe, name)
    torch.testing.assert_close(same, baseline, atol=2e-5, rtol=1e-4)
    with mmattn.apply(pipe, mmattn.FreeSwim(training_grid=TRAINING_GRIDS[name], entropy_rule="tokens", dual_path="off")):
        torch.testing.assert_close(_run(pipe, name), baseline, atol=2e-5, rtol=1e-4)  # factor 1 at N = T
    if name in ("tiny/wan", "tiny/pixart"):  # the dual path refreshed every step: the same cross-attention
        for uncond in ("window", "full"):
            with mmattn.apply(pipe, mmattn.FreeSwim(**unscaled, dual_path="on", refresh_every=1, uncond=uncond)):
                torch.testing.assert_close(_run(pipe, name), baseline, atol=2e-5, rtol=1e-4)
    assert torch.equal(_run(pipe, name), baseline)


@pytest.mark.parametrize("name,call", [("tiny/sd3", dict(height=64, width=64)), ("tiny/flux", dict(height=64, width=64)),
                                       ("tiny/wan", dict(height=64, width=64, num_frames=17))])
def test_freeswim_at_twice_the_size(name, call):
    pipe = build_tiny(name)
    dense = _run(pipe, name, **call)
    with mmattn.apply(pipe, mmattn.FreeSwim(training_grid=TRAINING_GRIDS[name])):
        out = _run(pipe, name, **call)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-4)


def test_freeswim_window_is_the_official_one():
    """2 * (t // 2) + 1 per spatial axis, centred; every frame; an axis at or below it covered whole."""
    config = mmattn.FreeSwim()
    assert config.window_of((21, 30, 52), (41, 60, 104), video=True) == Window3D((41, 31, 53))
    assert config.window_of((8, 9), (16, 16), video=False) == Window2D((9, 9))
    assert config.window_of((8, 8), (6, 12), video=False) == Window2D((6, 9))
    assert (config.dual_path, config.refresh_every, config.uncond, config.entropy_rule) == ("auto", 2, "window",
                                                                                             "official")


def test_freeswim_official_scaling_on_window_and_full_branch(monkeypatch):
    """Every self-attention's logits, windowed and the full branch's, scaled by sqrt(log 2T / log T) / sqrt(d),
    T one training frame's tokens, whatever the call's size; "tokens": sqrt(log N / log T) with all training tokens."""
    from mmattn.processors import windows as window_processors

    seen = []
    windowed, full = window_processors.windowed, window_processors.full_attention
    monkeypatch.setattr(window_processors, "windowed", lambda *a: seen.append(("window", a[4])) or windowed(*a))
    monkeypatch.setattr(window_processors, "full_attention", lambda *a: seen.append(("full", a[3])) or full(*a))
    pipe = build_tiny("tiny/wan")
    d = pipe.transformer.config.attention_head_dim
    call = dict(height=64, width=64, num_frames=17, num_inference_steps=2)
    with mmattn.apply(pipe, mmattn.FreeSwim(training_grid=(3, 4, 4))):
        _run(pipe, "tiny/wan", **call)
    official = math.sqrt(math.log(32) / math.log(16)) / math.sqrt(d)
    assert {kind for kind, _ in seen} == {"window", "full"}
    assert all(scale == pytest.approx(official) for _, scale in seen)
    seen.clear()
    with mmattn.apply(pipe, mmattn.FreeSwim(training_grid=(3, 4, 4), entropy_rule="tokens", dual_path="off")):
        _run(pipe, "tiny/wan", **call)
    tokens = 9 * 8 * 8  # 17 frames -> 9 latent frames (the tiny VAE halves time) of 8 x 8 tokens
    assert seen and all(s == pytest.approx(math.sqrt(math.log(tokens) / math.log(48)) / math.sqrt(d)) for _, s in seen)


def test_freeswim_dual_path_refreshes_every_k_steps():
    """The dense branch runs inside the hooked call, at steps 0, k, 2k, ...; in the official cached variant only for
    the cond call (Wan's uncond call stays windowed), in the no-cache variant for both."""
    pipe = build_tiny("tiny/wan")
    calls = []
    denoiser = pipe.transformer
    counter = denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))
    call = dict(height=64, width=64, num_frames=17, num_inference_steps=4)
    with mmattn.apply(pipe, mmattn.FreeSwim(training_grid=(3, 4, 4), dual_path="off")):
        plain = _run(pipe, "tiny/wan", **call)
    windowed_calls = len(calls)
    counter.remove()
    results = {}
    for uncond in ("window", "full"):
        calls.clear()
        config = mmattn.FreeSwim(training_grid=(3, 4, 4), refresh_every=2, uncond=uncond)
        with mmattn.apply(pipe, config):
            block = pipe.transformer.blocks[0]
            recorded = block.attn1.processor.core.dual
            original = recorded.guided._forward
            recorded.guided._forward = lambda *a, **k: (recorded.recording and calls.append("dense")) or original(*a, **k)
            counter = denoiser.register_forward_pre_hook(lambda module, args: calls.append(1))
            results[uncond] = _run(pipe, "tiny/wan", **call)
            counter.remove()
        assert calls.count(1) == windowed_calls  # no extra denoiser call
        assert calls.count("dense") == (2 if uncond == "window" else 4)  # steps 0 and 2; cond (and uncond)
        assert not torch.allclose(results[uncond], plain, atol=1e-4)
    assert not torch.allclose(results["window"], results["full"], atol=1e-5)


def test_freeswim_refusals():
    with pytest.raises(ValueError, match="a UNet's blocks see several"):
        mmattn.apply(build_tiny("tiny/sd"), mmattn.FreeSwim())
    with pytest.raises(ValueError, match="dual path needs a cross-attention module"):
        mmattn.apply(build_tiny("tiny/sd3"), mmattn.FreeSwim(dual_path="on"))
    with pytest.raises(ValueError, match="uncond='both'"):
        mmattn.FreeSwim(uncond="both")
    with pytest.raises(ValueError, match="refresh_every=0"):
        mmattn.FreeSwim(refresh_every=0)
    config = mmattn.FreeSwim(training_grid=(3, 4, 4), dual_path="on", steps=(0.1, 0.9))
    assert methods.from_dict(config.to_dict()) == config


def _tiny_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4, embed_dim=32,
                             depth=2, num_heads=2, num_classes=5, dynamic_img_size=True).eval()


def test_timm_vit_whole_grid_window_is_dense_and_runs_at_twice_the_resolution():
    vit = _tiny_vit()
    x, big = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 64, 64)
    features = vit.forward_features  # every token (the [CLS] head alone would not see windows in the last block)
    with torch.no_grad():
        baseline, baseline_big = features(x), features(big)
        with mmattn.apply(vit, WindowAttention(Window2D(8))):
            torch.testing.assert_close(features(x), baseline, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(vit(x), vit.forward_head(baseline), atol=1e-5, rtol=1e-4)
        with mmattn.apply(vit, WindowAttention(Window2D(5), layers="blocks.1")):
            windowed = features(big)
        assert torch.equal(features(big), baseline_big) and torch.equal(features(x), baseline)
    assert windowed.shape == baseline_big.shape and not torch.allclose(windowed, baseline_big, atol=1e-4)
    assert "forward" not in vit.blocks[1].attn.__dict__


def test_timm_vit_refusals():
    vit = _tiny_vit()
    with pytest.raises(ValueError, match="needs a Window2D"):
        mmattn.apply(vit, WindowAttention(Window3D(3)))
    with pytest.raises(ValueError, match="no attention layer named 'blocks.7'"):
        mmattn.apply(vit, WindowAttention(Window2D(3), layers="blocks.7"))


def test_wan22_windows_both_stages_and_restores():
    """Wan 2.2's low-noise transformer_2 gets the windows too (FreeSwim's dual path included): a window covering the
    whole grid equals dense attention on both stages, a small one changes both, remove() is bit-identical."""
    pipe = build_tiny("tiny/wan")
    pipe.register_modules(transformer_2=build_tiny("tiny/wan", seed=1).transformer)  # Wan 2.2's low-noise stage
    pipe.register_to_config(boundary_ratio=0.8)
    call = pipeline_defaults("tiny/wan") | {"output_type": "pt", "num_inference_steps": 4, "guidance_scale": 4.0,
                                            "guidance_scale_2": 3.0}

    def frames():
        return pipe("a red fox", generator=torch.Generator().manual_seed(0), **call).frames

    baseline = frames()
    with mmattn.apply(pipe, WindowAttention(Window3D((3, 4, 4)))):
        cores = [layer.processor.core for t in (pipe.transformer, pipe.transformer_2) for layer in
                 (block.attn1 for block in t.blocks)]
        assert all(core is not None for core in cores)
        torch.testing.assert_close(frames(), baseline, atol=1e-5, rtol=1e-4)
    with mmattn.apply(pipe, mmattn.FreeSwim(training_grid=(1, 2, 2), dual_path="on", refresh_every=2)):
        processor = pipe.transformer_2.blocks[0].attn1.processor
        calls, core = [], processor.core
        processor.core = lambda *a: calls.append(1) or core(*a)
        assert not torch.allclose(frames(), baseline, atol=1e-4)
        processor.core = core
        assert calls  # the low-noise steps ran windowed
    assert torch.equal(frames(), baseline)
    assert all(type(block.attn1.processor).__name__ == "WanAttnProcessor"
               for t in (pipe.transformer, pipe.transformer_2) for block in t.blocks)
