"""The guided ε a pipeline hands its scheduler equals the README's formula on every family, from independent
forwards of the untouched denoiser: with CFG batched (SD, SDXL, SD3, PixArt), without CFG, and with separate
cond / uncond calls (Wan; Flux's true CFG)."""

import math

import pytest
import torch

import mmattn
from mmattn import SLG, STG, SoftPAG
from mmattn.adapters import diffusion_family
from mmattn.testing import build_tiny, tiny_spec

_PIPES = {}


def pipe_for(name):
    if name not in _PIPES:
        _PIPES[name] = build_tiny(name)
    return _PIPES[name]


def first_step(pipe, name, prompt, **call):
    """(the ε the pipeline passes to its scheduler at step 0, [(args, kwargs, output) of each denoiser call in
    step 0]) of a one-step run."""
    denoiser = diffusion_family(pipe).denoiser(pipe)
    calls, eps = [], []
    hooks = [denoiser.register_forward_hook(lambda m, a, k, out: calls.append((a, k, out)), with_kwargs=True)]
    step = pipe.scheduler.step

    def recording_step(model_output, *args, **kwargs):
        eps.append(model_output.clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording_step
    try:
        kwargs = tiny_spec(name).defaults | {"output_type": "pt", "num_inference_steps": 1} | call
        pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    finally:
        del pipe.scheduler.step
        for hook in hooks:
            hook.remove()
    return eps[0], calls


def sample(output):
    return output[0] if isinstance(output, tuple) else output.sample


def rows_of(x, rows: slice, n: int):
    if isinstance(x, dict):
        return {k: rows_of(v, rows, n) for k, v in x.items()}
    return x[rows] if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == n else x


CASES = [  # (tiny model, pipeline arguments, CFG weight w or None, the pipeline computes uncond in its own call)
    ("tiny/sd", {"guidance_scale": 4.0}, 4.0, False),
    ("tiny/sd", {"guidance_scale": 1.0}, None, False),
    ("tiny/sd", {"guidance_scale": 4.0, "guidance_rescale": 0.7}, 4.0, False),
    ("tiny/sdxl", {"guidance_scale": 4.0}, 4.0, False),
    ("tiny/sdxl", {"guidance_scale": 4.0, "guidance_rescale": 1.0}, 4.0, False),
    ("tiny/sd3", {"guidance_scale": 4.0}, 4.0, False),
    ("tiny/sd3", {"guidance_scale": 1.0}, None, False),
    ("tiny/pixart", {"guidance_scale": 4.0}, 4.0, False),
    ("tiny/pixart", {"guidance_scale": 1.0}, None, False),
    ("tiny/flux", {}, None, False),
    ("tiny/flux", {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}, 3.0, True),
    ("tiny/wan", {"guidance_scale": 4.0}, 4.0, True),
    ("tiny/wan", {"guidance_scale": 1.0}, None, True),
    ("tiny/sana", {"guidance_scale": 4.0}, 4.0, False),
    ("tiny/sana", {"guidance_scale": 1.0}, None, False),
    ("tiny/cogvideox", {"guidance_scale": 4.0}, 4.0, False),
    ("tiny/cogvideox", {"guidance_scale": 1.0}, None, False),
    ("tiny/ltx", {"guidance_scale": 3.0}, 3.0, False),
    ("tiny/ltx", {"guidance_scale": 1.0}, None, False),
    ("tiny/hunyuandit", {"guidance_scale": 5.0}, 5.0, False),
    ("tiny/hunyuandit", {"guidance_scale": 1.0}, None, False),
    ("tiny/qwenimage", {}, 3.0, True),
    ("tiny/qwenimage", {"true_cfg_scale": 1.0}, None, True),
    ("tiny/hunyuanvideo", {}, None, False),
    ("tiny/hunyuanvideo", {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}, 3.0, True),
]


@pytest.mark.parametrize("rescale", [0.0, 0.7])
@pytest.mark.parametrize("prompts", [1, 2])
@pytest.mark.parametrize("name, call, w, separate", CASES)
def test_guided_eps_is_the_formula(name, call, w, separate, prompts, rescale):
    """... and with STG's rescale r: ε·(r·std(ε_c)/std(ε) + 1 − r), also where uncond comes in its own call."""
    pipe = pipe_for(name)
    if prompts == 2 and name not in ("tiny/pixart", "tiny/sd3", "tiny/flux"):
        pytest.skip("two prompts: one family of each CFG pattern")
    if rescale and not (separate or name == "tiny/sd3" or "guidance_rescale" in call):
        pytest.skip("rescale: the separate-call families and one batched family")
    prompt = "a red fox" if prompts == 1 else ["a red fox", "a blue bird"]
    family = diffusion_family(pipe)
    layer = list(family.attention_layers(family.denoiser(pipe)))[1]
    config = (STG(layers=layer, scale=2.0, rescale=rescale) if rescale else
              SoftPAG(heads=f"{layer}:0", strength=0.7, scale=2.0))
    _, calls = first_step(pipe, name, prompt, **call)
    assert len(calls) == (2 if separate and w else 1)
    args, kwargs, out = calls[0]
    n = sample(out).shape[0]
    b = n // 2 if w and not separate else n
    assert b == prompts
    if w is None:
        eps_u = None
        eps_c = sample(out)
    elif separate:
        eps_c, eps_u = sample(out), sample(calls[1][2])
    else:
        eps_u, eps_c = sample(out)[:b], sample(out)[b:]
    cond_args = tuple(rows_of(a, slice(n - b, n), n) for a in args)
    cond_kwargs = {k: rows_of(v, slice(n - b, n), n) for k, v in kwargs.items()}

    with mmattn.apply(pipe, config):
        guided = family.denoiser(pipe).forward
        inner, seen = guided._forward, []

        def spy(*a, **k):
            out = inner(*a, **k)
            seen.append(sample(out).shape[0])
            return out

        guided._forward = spy
        got, _ = first_step(pipe, name, prompt, **call)
        guided._forward = inner
        branch = guided.info.branches[0]
        branch.rows = slice(0, b)
        with torch.no_grad():
            eps_p = sample(guided._forward(*cond_args, **cond_kwargs))
        branch.rows = None
    eps_g = eps_c + config.scale * (eps_c - eps_p)
    want = eps_g if w is None else eps_u + w * (eps_c - eps_u) + config.scale * (eps_c - eps_p)
    if rescale:
        dims = tuple(range(1, want.ndim))
        want = want * (rescale * eps_c.std(dim=dims, keepdim=True) / want.std(dim=dims, keepdim=True) + 1 - rescale)
    phi = call.get("guidance_rescale", 0.0)
    if phi:  # the pipeline's own rescale (arXiv 2305.08891) toward the true conditional prediction
        dims = tuple(range(1, want.ndim))
        want = phi * want * eps_c.std(dim=dims, keepdim=True) / want.std(dim=dims, keepdim=True) + (1 - phi) * want
    if name == "tiny/qwenimage" and w:  # its true CFG rescales each token to the true conditional prediction's norm
        want = want * eps_c.norm(dim=-1, keepdim=True) / want.norm(dim=-1, keepdim=True)
    want = want[:, : got.shape[1]]  # PixArt's learned sigma: the scheduler gets the first channels
    assert not torch.allclose(eps_p, eps_c, atol=1e-4), "the perturbation changes the conditional prediction"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the inner forward saw one perturbed copy of the conditional rows, and none on an uncond call
    assert seen == [n + b] + ([b] if separate and w else [])


def test_wan_bookkeeping_resets_after_a_failed_call():
    """A fault inside the first (cond) call must not shift cond/uncond for the next pipeline call."""
    pipe = pipe_for("tiny/wan")
    with mmattn.apply(pipe, SoftPAG(heads="blocks.1:*", strength=1.0, scale=2.0)):
        guided = pipe.transformer.forward
        inner, seen = guided._forward, []

        def failing(*args, **kwargs):
            raise RuntimeError("fault in the cond call")

        guided._forward = failing
        with pytest.raises(RuntimeError, match="fault in the cond call"):
            first_step(pipe, "tiny/wan", "a red fox")

        def spy(*args, **kwargs):
            out = inner(*args, **kwargs)
            seen.append(sample(out).shape[0])
            return out

        guided._forward = spy
        first_step(pipe, "tiny/wan", "a red fox")
        guided._forward = inner
    assert seen == [2, 1]  # cond + perturbed batched, then uncond alone


@pytest.mark.parametrize("name", ["tiny/flux", "tiny/wan"])
def test_backend_set_while_applied_survives_remove(name):
    pipe = pipe_for(name)
    denoiser = diffusion_family(pipe).denoiser(pipe)
    layer = list(diffusion_family(pipe).attention_layers(denoiser))[1]
    attn = diffusion_family(pipe).attention_layers(denoiser)[layer]
    try:
        with mmattn.apply(pipe, SoftPAG(heads=f"{layer}:0", strength=0.5)):
            denoiser.set_attention_backend("native")
            assert attn.processor._attention_backend.value == "native"
        assert attn.processor._attention_backend is not None and attn.processor._attention_backend.value == "native"
    finally:
        denoiser.reset_attention_backend()
    assert attn.processor._attention_backend is None


def test_a_users_own_processor_is_refused_not_bypassed():
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class MyProcessor(JointAttnProcessor2_0):
        pass

    pipe = build_tiny("tiny/sd3")
    attn = pipe.transformer.transformer_blocks[1].attn
    mine = MyProcessor()
    attn.set_processor(mine)
    before = dict(pipe.transformer.attn_processors)
    with pytest.raises(ValueError, match="transformer_blocks.1 uses MyProcessor, which mmattn cannot change"):
        mmattn.apply(pipe, SoftPAG(heads="transformer_blocks.0-1:0"))
    assert dict(pipe.transformer.attn_processors) == before and attn.processor is mine
    with mmattn.apply(pipe, SoftPAG(heads="transformer_blocks.2:0")):  # other layers still work
        assert attn.processor is mine
    with mmattn.apply(pipe, SLG(layers="transformer_blocks.1", start=0.0, stop=1.0)):  # a block skip keeps it
        assert attn.processor is mine


def test_the_core_slot_replaces_only_the_attention_call():
    """A core set on a family processor runs instead of the original's attention call, between the query ops
    and the output ops; the original core through the slot changes nothing."""
    from mmattn.processors.diffusion import FamilyProcessor

    pipe = build_tiny("tiny/sd3")
    baseline = first_step(pipe, "tiny/sd3", "a red fox")[0]
    with mmattn.apply(pipe, SoftPAG(heads="transformer_blocks.1:0", strength=0.5, scale=0.0)):
        processor = pipe.transformer.transformer_blocks[1].attn.processor
        assert isinstance(processor, FamilyProcessor)
        calls = []

        def core(query, key, value, mask):
            calls.append(query.shape)
            return processor.original_core(query, key, value, mask)

        processor.core = core
        same = first_step(pipe, "tiny/sd3", "a red fox")[0]
        processor.core = lambda q, k, v, m: torch.zeros_like(q)
        zeroed = first_step(pipe, "tiny/sd3", "a red fox")[0]
    assert calls and torch.equal(same, baseline)
    assert not torch.allclose(zeroed, baseline)


def official_seg_blur(planes: torch.Tensor, sigma: float) -> torch.Tensor:
    """Written from SEG-SDXL's rule: (C, H, W) planes, kernel ceil(6σ) made odd, clipped to W (odd) or W + 1
    (even), a 2-D product kernel, reflect padding of k // 2; σ above 9999: the mean."""
    import torch.nn.functional as F

    if sigma > 9999:
        return planes.mean(dim=(-2, -1), keepdim=True).expand_as(planes)
    k = math.ceil(6 * sigma)
    k = k + 1 - k % 2
    width = planes.shape[-1]
    k = min(k, width if width % 2 else width + 1)
    taps = torch.exp(-0.5 * (torch.linspace(-(k - 1) / 2, (k - 1) / 2, k) / sigma) ** 2)
    taps = taps / taps.sum()
    kernel = (taps[:, None] * taps[None, :]).expand(planes.shape[0], 1, k, k)
    padded = F.pad(planes[None], [k // 2] * 4, mode="reflect")
    return F.conv2d(padded, kernel, groups=planes.shape[0])[0]


@pytest.mark.parametrize("side, sigma", [(16, 10.0), (16, 1.0), (4, 10.0), (5, 2.0), (7, 0.4), (8, 9999999.0)])
def test_seg_blur_follows_the_official_kernel_clip(side, sigma):
    from mmattn.processors.perturbation import gaussian_blur_tokens

    x = torch.randn(1, 2, side * side, 3, generator=torch.Generator().manual_seed(side))
    got = gaussian_blur_tokens(x, (1, side, side), sigma)
    planes = x[0].permute(0, 2, 1).reshape(6, side, side)  # (heads * D, rows, cols)
    want = official_seg_blur(planes, sigma).reshape(2, 3, side * side).permute(0, 2, 1)[None]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("start, stop", [(0.0, 0.5), (0.25, 0.75), (0.01, 0.2)])
def test_slg_window_is_sd3s_open_interval(start, stop):
    """SLG guides exactly the steps SD3's skip_guidance_layers does: n * start < i < n * stop."""
    pipe = pipe_for("tiny/sd3")
    n = 8
    want = [i for i in range(n) if n * start < i < n * stop]
    with mmattn.apply(pipe, SLG(layers="transformer_blocks.1", scale=2.0, start=start, stop=stop)):
        branch = pipe.transformer.forward.info.branches[0]
        assert [i for i in range(n) if branch.covers(i, n)] == want


def test_soft_seg_blends_plain_and_blurred_queries():
    """SEG(strength=u): the perturbed rows' image queries are (1-u) q + u blur(q); u = 0 leaves the output as it is."""
    from mmattn.guidance import Branch, CallInfo
    from mmattn.processors.diffusion import PROCESSORS
    from mmattn.processors.perturbation import HeadOp, gaussian_blur_tokens

    pipe = pipe_for("tiny/sd3")
    attn = pipe.transformer.transformer_blocks[1].attn
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 16, 32, generator=g), torch.randn(2, 9, 32, generator=g)
    grid = (1, 4, 4)

    def run(strength, sigma=1.5):
        processor = PROCESSORS["sd3"](attn.processor, CallInfo(token_grid=grid))
        processor.ops.append(HeadOp(Branch(1.0, 0.0, 1.0, rows=slice(1, 2)), torch.tensor([0, 2]), "blur", strength,
                                    sigma=sigma))
        seen = []
        processor.core = lambda q, k, v, m: seen.append(q.clone()) or processor.original_core(q, k, v, m)
        with torch.no_grad():
            out = processor(attn, x, ctx)
        return out, seen[0]

    plain_out, plain_q = run(0.0)
    with torch.no_grad():
        assert torch.equal(plain_out[0], attn.processor(attn, x, ctx)[0])
    _, q_half = run(0.5)
    _, q_full = run(1.0)
    want = plain_q.clone()
    tokens = plain_q[1:2][:, [0, 2], :16]
    want[1:2, [0, 2], :16] = torch.lerp(tokens, gaussian_blur_tokens(tokens, grid, 1.5), 0.5)
    torch.testing.assert_close(q_half, want)
    assert not torch.allclose(q_half, q_full)


FORK_CASES = [  # (tiny model, call arguments, prompts, SoftPAG layer, STG-skipped block): both after the first block
    ("tiny/sd3", {"guidance_scale": 4.0}, 2, "transformer_blocks.2", "transformer_blocks.3"),
    ("tiny/flux", {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}, 1, "single_transformer_blocks.0",
     "single_transformer_blocks.1"),
    ("tiny/wan", {"guidance_scale": 4.0}, 1, "blocks.1", "blocks.1"),
    ("tiny/pixart", {"guidance_scale": 4.0}, 2, "transformer_blocks.1", "transformer_blocks.1"),
    ("tiny/sana", {"guidance_scale": 4.0}, 2, "transformer_blocks.1", "transformer_blocks.1"),
    ("tiny/cogvideox", {"guidance_scale": 4.0}, 1, "transformer_blocks.1", "transformer_blocks.1"),
    ("tiny/ltx", {"guidance_scale": 3.0}, 2, "transformer_blocks.1", "transformer_blocks.1"),
    ("tiny/qwenimage", {}, 1, "transformer_blocks.1", "transformer_blocks.1"),
    ("tiny/hunyuanvideo", {"true_cfg_scale": 3.0, "negative_prompt": "blurry"}, 1, "single_transformer_blocks.0",
     "single_transformer_blocks.1"),
]


def _generate(pipe, name, prompt, call):
    kwargs = tiny_spec(name).defaults | {"output_type": "pt", "num_inference_steps": 2} | call
    out = pipe(prompt, generator=torch.Generator().manual_seed(0), **kwargs)
    return out.frames if hasattr(out, "frames") else out.images


@pytest.mark.parametrize("name, call, prompts, layer, block", FORK_CASES)
def test_fork_at_the_first_perturbed_block_equals_the_whole_branch(name, call, prompts, layer, block, monkeypatch):
    """Blocks before the first perturbed one run on [uncond, cond] only, the conditional rows are copied into the
    perturbed ones there, and the output equals the unforked branch and one forward per branch."""
    from mmattn.guidance import GuidedDenoiser

    pipe = pipe_for(name)
    family = diffusion_family(pipe)
    blocks = family.blocks(family.denoiser(pipe))
    prompt = ["a red fox", "a blue bird"][:prompts]
    methods = [SoftPAG(heads=f"{layer}:0", strength=0.7, scale=2.0), STG(layers=block, mode="residual", scale=1.5)]
    separate = family.cfg_calls == "separate"
    n = prompts * (1 if separate else 2)  # the rows of the cond call (separate CFG) or of [uncond, cond]
    seen = {}
    hooks = [module.register_forward_hook(
        lambda m, args, kwargs, out, key=key: seen.setdefault(key, []).append(
            (kwargs.get("hidden_states", args[0] if args else None)).shape[0]), with_kwargs=True)
        for key, module in blocks.items()]
    try:
        with mmattn.apply(pipe, methods):
            forked = _generate(pipe, name, prompt, call)
        first = list(blocks).index(layer)
        for i, key in enumerate(blocks):
            calls = seen[key][0::2] if separate else seen[key]  # the cond call of each step (Wan, Flux: then uncond)
            assert set(calls) == {n if i < first else n + 2 * prompts}, (key, seen[key])
        monkeypatch.setattr(GuidedDenoiser, "fork", False)
        with mmattn.apply(pipe, methods):
            whole = _generate(pipe, name, prompt, call)
        monkeypatch.undo()
        with mmattn.apply(pipe, [type(m)(**{**vars(m), "batch_branches": False}) for m in methods]):
            separate_forwards = _generate(pipe, name, prompt, call)
    finally:
        for hook in hooks:
            hook.remove()
    torch.testing.assert_close(forked, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(separate_forwards, whole, atol=1e-5, rtol=1e-5)


def test_the_unet_keeps_the_whole_branch():
    """A UNet's up blocks read skip connections from its down blocks: every block sees the perturbed rows."""
    pipe = pipe_for("tiny/sd")
    family = diffusion_family(pipe)
    blocks = family.blocks(family.denoiser(pipe))
    layer = "up_blocks.1.attentions.0.transformer_blocks.0"
    seen = []
    hook = blocks["down_blocks.0.attentions.0.transformer_blocks.0"].register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        with mmattn.apply(pipe, SoftPAG(heads=f"{layer}:0", scale=2.0)):
            _generate(pipe, "tiny/sd", "a red fox", {"guidance_scale": 4.0})
    finally:
        hook.remove()
    assert set(seen) == {3}


def wan22():
    """tiny/wan as Wan 2.2: a second transformer (its own weights) for the low-noise steps below boundary 0.8."""
    from mmattn.testing import build_tiny as build

    pipe = build("tiny/wan")
    second = build("tiny/wan", seed=1).transformer
    pipe.register_modules(transformer_2=second)
    pipe.register_to_config(boundary_ratio=0.8)
    return pipe


def test_wan22_perturbs_both_stages_with_each_stages_cfg_scale():
    """Both transformers get the branch; the guided ε of a low-noise step (transformer_2) is the formula with
    guidance_scale_2; u = 0 changes nothing and remove() restores both stages bit for bit."""
    pipe = wan22()
    assert not torch.equal(pipe.transformer.blocks[0].attn1.to_q.weight, pipe.transformer_2.blocks[0].attn1.to_q.weight)
    call = {"num_inference_steps": 4, "guidance_scale": 4.0, "guidance_scale_2": 2.0}
    kwargs = tiny_spec("tiny/wan").defaults | {"output_type": "pt"} | call

    def run(record=None):
        eps, step = [], pipe.scheduler.step

        def recording_step(model_output, *args, **kw):
            eps.append(model_output.clone())
            return step(model_output, *args, **kw)

        pipe.scheduler.step = recording_step
        hooks = [] if record is None else [pipe.transformer_2.register_forward_hook(
            lambda m, a, k, out: record.append((a, k, out)), with_kwargs=True)]
        try:
            frames = pipe("a red fox", generator=torch.Generator().manual_seed(0), **kwargs).frames
        finally:
            del pipe.scheduler.step
            for hook in hooks:
                hook.remove()
        return frames, eps

    baseline, _ = run()
    config = SoftPAG(heads="blocks.1:*", strength=0.8, scale=2.0)
    seen, calls = {}, []
    with mmattn.apply(pipe, config):
        inners = {name: getattr(pipe, name).forward._forward for name in ("transformer", "transformer_2")}
        for name, inner in inners.items():
            def spy(*a, inner=inner, name=name, **k):
                out = inner(*a, **k)
                seen.setdefault(name, []).append(sample(out).shape[0])
                return out

            getattr(pipe, name).forward._forward = spy
        _, eps = run(calls)
        for name, inner in inners.items():
            getattr(pipe, name).forward._forward = inner
    high, low = seen["transformer"], seen["transformer_2"]  # cond + perturbed, then uncond, in each step
    assert high == [2, 1] * (len(high) // 2) and low == [2, 1] * (len(low) // 2) and len(high) + len(low) == 8
    # the last step (low-noise stage): independent forwards of the untouched transformer_2
    args, kw, _ = calls[-2]
    with torch.no_grad():
        eps_c = sample(pipe.transformer_2(*args, **kw))
        eps_u = sample(pipe.transformer_2(*calls[-1][0], **calls[-1][1]))
        with mmattn.apply(pipe, config):
            branch = pipe.transformer_2.forward.info.branches[0]
            branch.rows = slice(0, 1)
            eps_p = sample(pipe.transformer_2.forward._forward(*args, **kw))
            branch.rows = None
    want = eps_u + 2.0 * (eps_c - eps_u) + config.scale * (eps_c - eps_p)
    torch.testing.assert_close(eps[-1], want, atol=1e-4, rtol=1e-4)
    with mmattn.apply(pipe, SoftPAG(heads="blocks.1:*", strength=0.0, scale=2.0)):
        same, _ = run()
    after, _ = run()
    torch.testing.assert_close(same, baseline, atol=1e-6, rtol=1e-6)  # u = 0: the branch equals cond (batched)
    assert torch.equal(after, baseline)
    assert "forward" not in pipe.transformer.__dict__ and "forward" not in pipe.transformer_2.__dict__
    from diffusers import WanPipeline

    assert type(pipe) is WanPipeline
