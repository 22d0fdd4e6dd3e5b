"""SoftPAG: eager and diffusers oracles, guidance math, identities and exact restore on every family."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPAGPipeline, StableDiffusionXLPAGPipeline

import mmattn
from mmattn import SoftPAG
from mmattn import PAG, SEG, SLG, STG
from mmattn.guidance import Branch, CallInfo
from mmattn.processors.diffusion import PROCESSORS
from mmattn.processors.perturbation import HeadOp, gaussian_blur_tokens
from mmattn.adapters import diffusion_family
from mmattn.configs import SCOPES
from mmattn.testing import build_tiny, tiny_spec

FAMILIES = ["tiny/sd", "tiny/sdxl", "tiny/sd3", "tiny/flux", "tiny/wan", "tiny/pixart", "tiny/sana", "tiny/cogvideox", "tiny/ltx",
            "tiny/hunyuandit", "tiny/qwenimage", "tiny/hunyuanvideo"]
_PIPES = {}


def pipe_for(name):
    if name not in _PIPES:
        _PIPES[name] = build_tiny(name)
    return _PIPES[name]


@pytest.fixture(scope="module")
def sd3():
    return pipe_for("tiny/sd3")


def run(pipe, name="tiny/sd3", prompt="a red fox", seed=0, **kwargs):
    call = tiny_spec(name).defaults | {"output_type": "pt"} | kwargs
    generator = [torch.Generator().manual_seed(s) for s in seed] if isinstance(seed, list) else torch.Generator().manual_seed(seed)
    out = pipe(prompt, generator=generator, **call)
    return out.frames if hasattr(out, "frames") else out.images


def middle_layer(pipe):
    family = diffusion_family(pipe)
    layers = list(family.attention_layers(family.denoiser(pipe)))
    return layers[len(layers) // 2]


def with_op(family, original, heads, rows, kind="blend", grid=None, **op):
    """A family's perturbed processor with one op on ``heads`` for batch ``rows``."""
    processor = PROCESSORS[family](original, CallInfo(token_grid=grid))
    processor.ops.append(HeadOp(Branch(1.0, 0.0, 1.0, rows=rows), torch.tensor(heads), kind, **op))
    return processor


def scoped_map(scores, a, n_image: int, text_first: bool, scope: str) -> torch.Tensor:
    """HeadHunter's logit perturbation written out (its ``skip_attention``): the scope's block of the (B, H, N, N)
    logits set to -inf (an identity block keeps its diagonal), softmax; rows of the other query group keep ``a``."""
    size = scores.shape[-1]
    image = slice(size - n_image, size) if text_first else slice(0, n_image)
    text = slice(0, size - n_image) if text_first else slice(n_image, size)
    groups = {"I": image, "T": text}
    rows, cols = groups[scope[0]], groups[scope[1]]
    mask = torch.zeros(size, size)
    mask[rows, cols] = float("-inf")
    if scope.endswith("identity"):
        mask[rows, cols].fill_diagonal_(0)
    t = torch.softmax(scores + mask, dim=-1)
    other = groups["T" if scope[0] == "I" else "I"]
    t[:, :, other] = a[:, :, other]
    return t


def eager_joint_attention(attn, x, ctx, heads, u, target, rows, scope="joint", query_fn=None):
    """Oracle: materialise A per head, blend the perturbed rows' selected heads, then A·V."""
    b, n = x.shape[:2]

    def split(t):
        return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

    def norm(f, t):
        return t if f is None else f(t)

    q = torch.cat([norm(attn.norm_q, split(attn.to_q(x))), norm(attn.norm_added_q, split(attn.add_q_proj(ctx)))], 2)
    k = torch.cat([norm(attn.norm_k, split(attn.to_k(x))), norm(attn.norm_added_k, split(attn.add_k_proj(ctx)))], 2)
    v = torch.cat([split(attn.to_v(x)), split(attn.add_v_proj(ctx))], 2)
    if query_fn is not None:
        q = query_fn(q)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    a = torch.softmax(scores, dim=-1)
    size = a.shape[-1]
    if scope != "joint":
        t = scoped_map(scores, a, n, text_first=False, scope="II_identity" if scope == "image" else scope)
    else:
        t = torch.eye(size) if target == "identity" else torch.full((size, size), 1.0 / size)
    for h in heads:
        a[rows, h] = (1 - u) * a[rows, h] + u * (t[rows, h] if scope != "joint" else t)
    o = (a @ v).transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
    out, ctx_out = o[:, :n], o[:, n:]
    return attn.to_out[0](out), (attn.to_add_out(ctx_out) if not attn.context_pre_only else ctx_out)


@pytest.mark.parametrize("u, target, heads, scope", [(1.0, "identity", (0, 3), "joint"), (0.4, "identity", (1,), "joint"),
                                                     (0.7, "uniform", (0, 1, 2, 3), "joint"), (0.6, "identity", (0, 2), "image"),
                                                     *[(0.7, "identity", (1, 2), s) for s in SCOPES[2:]]])
def test_processor_matches_eager_oracle(sd3, u, target, heads, scope):
    attn = sd3.transformer.transformer_blocks[1].attn
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(3, 17, 32, generator=g), torch.randn(3, 9, 32, generator=g)
    processor = with_op("sd3", attn.processor, heads, slice(1, 3), strength=u, target=target,
                        scope="II_identity" if scope == "image" else scope)
    with torch.no_grad():
        got = processor(attn, x, ctx)
        want = eager_joint_attention(attn, x, ctx, heads, u, target, slice(1, 3), scope)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # rows outside the perturbed slice are the unmodified attention
    with torch.no_grad():
        plain = eager_joint_attention(attn, x, ctx, heads, 0.0, target, slice(0, 0))
    torch.testing.assert_close(got[0][:1], plain[0][:1], atol=2e-5, rtol=1e-4)


def test_seg_processor_matches_eager_oracle_with_torchvision_blur(sd3):
    """SEG on a non-square 3x4 token grid: our separable blur == torchvision's gaussian_blur (reflect)."""
    from torchvision.transforms.functional import gaussian_blur

    attn = sd3.transformer.transformer_blocks[1].attn
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 12, 32, generator=g), torch.randn(2, 9, 32, generator=g)
    heads, rows, sigma = (1, 2), slice(1, 2), 1.0

    def blur_query(q):
        q = q.clone()
        for h in heads:
            planes = q[rows, h, :12].reshape(1, 3, 4, -1).permute(0, 3, 1, 2)  # (1, D, rows=3, cols=4)
            # official clip: 3 rows (odd) -> 3 taps, 4 columns (even) -> 5 taps; torchvision takes [x, y] sizes
            blurred = gaussian_blur(planes, kernel_size=[5, 3], sigma=[sigma, sigma])
            q[rows, h, :12] = blurred.permute(0, 2, 3, 1).reshape(1, 12, -1)
        return q

    processor = with_op("sd3", attn.processor, heads, rows, kind="blur", grid=(1, 3, 4), sigma=sigma)
    with torch.no_grad():
        got = processor(attn, x, ctx)
        want = eager_joint_attention(attn, x, ctx, heads, 0.0, "identity", rows, query_fn=blur_query)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_blur_of_infinite_sigma_is_the_mean_and_direction_is_right():
    grid = (2, 3, 5)  # frames, rows, cols
    x = torch.randn(1, 2, 30, 4)
    mean = gaussian_blur_tokens(x, grid, float("inf"))
    torch.testing.assert_close(mean, x.view(1, 2, 2, 15, 4).mean(3, keepdim=True).expand(1, 2, 2, 15, 4).reshape(1, 2, 30, 4))
    # a pattern constant along rows (varies only with the column) stays constant along rows after blurring
    cols = torch.arange(5.0).view(1, 1, 1, 1, 5, 1).expand(1, 1, 2, 3, 5, 1).reshape(1, 1, 30, 1)
    blurred = gaussian_blur_tokens(cols, grid, 1.0).view(2, 3, 5)
    assert torch.allclose(blurred, blurred[:, :1].expand(2, 3, 5))
    assert not torch.allclose(blurred, cols.view(2, 3, 5))


def test_guided_denoiser_combines_three_branches(sd3):
    """One batched forward equals ε_c + (s/w)(ε_c − ε_p) from separate forwards."""
    tr = sd3.transformer
    g = torch.Generator().manual_seed(2)
    kwargs = dict(hidden_states=torch.randn(2, 16, 4, 4, generator=g), timestep=torch.tensor([500.0, 500.0]),
                  encoder_hidden_states=torch.randn(2, 13, 64, generator=g), pooled_projections=torch.randn(2, 64, generator=g),
                  return_dict=False)
    sd3._guidance_scale = 5.0
    sd3.scheduler.set_timesteps(4)
    with torch.no_grad():
        eps_u, eps_c = tr(**kwargs)[0].chunk(2)
        with mmattn.apply(sd3, SoftPAG(heads="transformer_blocks.1:0,2", strength=0.8, scale=2.0)):
            guided = tr(**kwargs)[0]
            branch = tr.transformer_blocks[1].attn.processor.ops[0].branch
            branch.rows = slice(0, 1)  # perturb the single conditional row, run alone
            cond_only = {k: (v[1:] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            eps_p = tr.forward._forward(**cond_only)[0]  # the unwrapped forward, perturbed rows = all
            branch.rows = None
    torch.testing.assert_close(guided[:1], eps_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided[1:], eps_c + (2.0 / 5.0) * (eps_c - eps_p), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(eps_p, eps_c, atol=1e-4)


def test_errors_leave_nothing_applied(sd3):
    before = dict(sd3.transformer.attn_processors)
    with pytest.raises(ValueError, match=r"has heads 0-3; got \[7\]"):
        mmattn.apply(sd3, SoftPAG(heads="transformer_blocks.1:7"))
    with pytest.raises(ValueError, match="valid layers: transformer_blocks.0-3"):
        mmattn.apply(sd3, [SoftPAG(heads="transformer_blocks.1:0"), SoftPAG(heads="transformer_blocks.9")])
    assert dict(sd3.transformer.attn_processors) == before
    assert "forward" not in sd3.transformer.__dict__


@pytest.mark.parametrize("field, value, message", [
    ("strength", 1.5, r"strength=1.5 is out of range: expected a number in \[0.0, 1.0\]"),
    ("scale", -1.0, r"scale=-1.0 is out of range"),
    ("target", "zeros", r"target='zeros': expected 'identity' or 'uniform'"),
    ("start", 0.8, r"stop=0.5 is before start=0.8"),
])
def test_config_validation(field, value, message):
    kwargs = {"heads": "transformer_blocks.0", "stop": 0.5} if field == "start" else {"heads": "transformer_blocks.0"}
    with pytest.raises(ValueError, match=message):
        SoftPAG(**kwargs, **{field: value})


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_identities_and_exact_restore(name):
    pipe = pipe_for(name)
    heads = f"{middle_layer(pipe)}:*"
    baseline = run(pipe, name)
    with mmattn.apply(pipe, SoftPAG(heads=heads, strength=0.0, scale=3.0)):
        zero = run(pipe, name)
    with mmattn.apply(pipe, SoftPAG(heads=heads, strength=1.0, scale=3.0)):
        perturbed = run(pipe, name)
    with mmattn.apply(pipe, SoftPAG(heads=heads, strength=1.0, scale=0.0)):
        no_scale = run(pipe, name)
    after = run(pipe, name)
    torch.testing.assert_close(zero, baseline, atol=1e-5, rtol=0)
    torch.testing.assert_close(no_scale, baseline, atol=1e-5, rtol=0)
    assert (perturbed - baseline).abs().max() > 1e-3
    assert torch.equal(after, baseline)
    assert "forward" not in diffusion_family(pipe).denoiser(pipe).__dict__


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_batch_of_two_equals_two_runs(name):
    pipe = pipe_for(name)
    with mmattn.apply(pipe, SoftPAG(heads=f"{middle_layer(pipe)}:1,3", strength=0.5, scale=2.0)):
        batch = run(pipe, name, prompt=["a red fox", "a blue car"], seed=[0, 1])
        single = torch.cat([run(pipe, name, prompt=p, seed=s) for p, s in (("a red fox", 0), ("a blue car", 1))])
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_unperturbed_rows_equal_the_original_processor(name):
    """With no perturbed rows the replacement processor computes what the original computes."""
    pipe = pipe_for(name)
    family = diffusion_family(pipe)
    attn = family.attention_layers(family.denoiser(pipe))[middle_layer(pipe)]
    calls = []
    hook = attn.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    try:
        run(pipe, name, num_inference_steps=1)
    finally:
        hook.remove()
    args, kwargs = calls[0]
    original = attn.processor
    ours = with_op(family.name, original, (0, 1), None)
    with torch.no_grad():
        want, got = original(attn, *args, **kwargs), ours(attn, *args, **kwargs)
    for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name, module", [("tiny/flux", "transformer_flux"), ("tiny/wan", "transformer_wan")])
@pytest.mark.parametrize("u, target", [(1.0, "identity"), (0.3, "identity"), (0.6, "uniform")])
def test_dispatch_families_match_patched_diffusers_oracle(monkeypatch, name, module, u, target):
    """Oracle: diffusers' own processor with its attention call replaced by the blended one on chosen heads."""
    import importlib

    pipe = pipe_for(name)
    family = diffusion_family(pipe)
    layers = family.attention_layers(family.denoiser(pipe))
    heads = (0, 2)
    calls = []
    for layer in layers.values():
        layer.register_forward_pre_hook(lambda m, args, kwargs: calls.append((m, args, kwargs)), with_kwargs=True)
    try:
        run(pipe, name, num_inference_steps=1)
    finally:
        for layer in layers.values():
            layer._forward_pre_hooks.clear()
    diffusers_module = importlib.import_module(f"diffusers.models.transformers.{module}")
    real = diffusers_module.dispatch_attention_fn

    def blended(query, key, value, **kwargs):
        out = real(query, key, value, **kwargs)
        v = value.mean(1, keepdim=True).expand_as(value) if target == "uniform" else value
        out[:, :, list(heads)] = torch.lerp(out[:, :, list(heads)], v[:, :, list(heads)].to(out.dtype), u)
        return out

    for attn, args, kwargs in calls[:: max(1, len(calls) // 4)]:
        batch = (kwargs.get("hidden_states", args[0] if args else None)).shape[0]
        ours = with_op(family.name, attn.processor, heads, slice(0, batch), strength=u, target=target)
        with torch.no_grad():
            got = ours(attn, *args, **kwargs)
            monkeypatch.setattr(diffusers_module, "dispatch_attention_fn", blended)
            want = attn.processor(attn, *args, **kwargs)
            monkeypatch.setattr(diffusers_module, "dispatch_attention_fn", real)
        for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name, pag_class, mid", [
    ("tiny/sd", StableDiffusionPAGPipeline, "mid_block.attentions.0.transformer_blocks.0"),
    ("tiny/sdxl", StableDiffusionXLPAGPipeline, "mid_block.attentions.0.transformer_blocks.0-1"),
])
def test_layer_level_pag_equals_diffusers_unet_pag_pipelines(name, pag_class, mid):
    """SoftPAG u=1 on every head of the UNet mid block == diffusers' PAG pipeline with pag_applied_layers=["mid"]."""
    pipe = pipe_for(name)
    pag = pag_class(**pipe.components, pag_applied_layers=["mid"])
    call = tiny_spec(name).defaults | {"output_type": "pt", "guidance_scale": 7.5}
    want = pag("a red fox", generator=torch.Generator().manual_seed(0), pag_scale=3.0, **call).images
    with mmattn.apply(pipe, SoftPAG(heads=f"{mid}:*", strength=1.0, scale=3.0)):
        got = pipe("a red fox", generator=torch.Generator().manual_seed(0), **call).images
    baseline = pipe("a red fox", generator=torch.Generator().manual_seed(0), **call).images
    assert (want - baseline).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, pag_class, layer, w", [
    ("tiny/sana", "SanaPAGPipeline", "transformer_blocks.0", 4.5), ("tiny/sana", "SanaPAGPipeline", "transformer_blocks.1", 4.5),
    ("tiny/hunyuandit", "HunyuanDiTPAGPipeline", "blocks.0", 5.0), ("tiny/hunyuandit", "HunyuanDiTPAGPipeline", "blocks.1", 5.0),
])
def test_layer_level_pag_equals_diffusers_dit_pag_pipelines(name, pag_class, layer, w):
    """PAG on every head of one block == diffusers' PAG pipeline with that block in pag_applied_layers (Sana's linear
    attention: the perturbed output is V)."""
    import diffusers

    pipe = pipe_for(name)
    pag = getattr(diffusers, pag_class)(**pipe.components, pag_applied_layers=[layer])
    call = tiny_spec(name).defaults | {"output_type": "pt", "guidance_scale": w}
    want = pag("a red fox", generator=torch.Generator().manual_seed(0), pag_scale=3.0, **call).images
    with mmattn.apply(pipe, PAG(heads=layer, scale=3.0)):
        got = pipe("a red fox", generator=torch.Generator().manual_seed(0), **call).images
    baseline = pipe("a red fox", generator=torch.Generator().manual_seed(0), **call).images
    assert (want - baseline).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_selecting_all_heads_equals_layer_selection(sd3):
    by_heads = SoftPAG(heads="transformer_blocks.1:0-3", strength=0.6)
    by_layer = SoftPAG(heads="transformer_blocks.1", strength=0.6)
    with mmattn.apply(sd3, by_heads):
        a = run(sd3)
    with mmattn.apply(sd3, by_layer):
        b = run(sd3)
    assert torch.equal(a, b)


def test_wan_uncond_call_passes_through():
    """Wan calls the denoiser for cond, then uncond: only the cond call carries the perturbed branch."""
    pipe = pipe_for("tiny/wan")
    seen = []
    handle = mmattn.apply(pipe, SoftPAG(heads="blocks.1:*", strength=1.0, scale=2.0))
    inner = pipe.transformer.forward._forward

    def spy(*args, **kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).shape[0])
        return inner(*args, **kwargs)

    pipe.transformer.forward._forward = spy
    try:
        run(pipe, "tiny/wan")
    finally:
        handle.remove()
    assert seen == [2, 1, 2, 1]  # 2 steps x (cond + perturbed batched, then uncond alone)


@pytest.mark.slow
def test_sd3_image_scope_pag_equals_diffusers_sd3_pag_pipeline(sd3):
    """PAG on the image×image block of every head == StableDiffusion3PAGPipeline for the same layer."""
    from diffusers import StableDiffusion3PAGPipeline

    pag = StableDiffusion3PAGPipeline.from_pipe(sd3, pag_applied_layers=["blocks.1"])
    call = tiny_spec("tiny/sd3").defaults | {"output_type": "pt"}
    want = pag("a red fox", generator=torch.Generator().manual_seed(0), pag_scale=3.0, **call).images
    with mmattn.apply(sd3, SoftPAG(heads="transformer_blocks.1", strength=1.0, scale=3.0, scope="image")):
        got = run(sd3)
    with mmattn.apply(sd3, SoftPAG(heads="transformer_blocks.1", strength=1.0, scale=3.0)):
        joint = run(sd3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (joint - want).abs().max() > 1e-3  # the joint scope is a different perturbation


def test_image_scope_is_ii_identity_end_to_end():
    """scope="image" (diffusers' SD3 PAG) is HeadHunter's II_identity; on Flux too, through a whole pipeline."""
    pipe = pipe_for("tiny/flux")
    outputs = []
    for scope in ("image", "II_identity", "joint"):
        with mmattn.apply(pipe, SoftPAG(heads="transformer_blocks.0", scope=scope, strength=0.7)):
            outputs.append(run(pipe, "tiny/flux"))
    assert np.array_equal(outputs[0], outputs[1]) and not np.array_equal(outputs[0], outputs[2])


def sd3_inputs(batch=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, 4, 4, generator=g), timestep=torch.full((batch,), 500.0),
                encoder_hidden_states=torch.randn(batch, 13, 64, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g), return_dict=False)


def perturbed_prediction(pipe, config, cond_only):
    """ε of the conditional row under one method alone: its branch's rows cover the whole batch."""
    tr = pipe.transformer
    with mmattn.apply(pipe, config):
        branch = tr.forward.info.branches[0]
        branch.rows = slice(0, cond_only["hidden_states"].shape[0])
        try:
            return tr.forward._forward(**cond_only)[0]
        finally:
            branch.rows = None


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_several_methods_combine_in_one_forward(sd3, rescale):
    """[u, c, p1, p2] in one call == ε_u + w(ε_c − ε_u) + s1(ε_c − ε_1) + s2(ε_c − ε_2), rescaled like STG."""
    tr = sd3.transformer
    kwargs = sd3_inputs()
    sd3._guidance_scale, w = 4.0, 4.0
    sd3.scheduler.set_timesteps(4)
    pag = PAG(heads="transformer_blocks.1:0,2", scale=2.0)
    stg = STG(layers="transformer_blocks.2", mode="residual", scale=1.5, rescale=rescale)
    cond_only = {k: (v[1:] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    with torch.no_grad():
        eps_u, eps_c = tr(**kwargs)[0].chunk(2)
        eps_1 = perturbed_prediction(sd3, pag, cond_only)
        eps_2 = perturbed_prediction(sd3, stg, cond_only)
        with mmattn.apply(sd3, [pag, stg]):
            guided_u, guided_c = tr(**kwargs)[0].chunk(2)
    final = guided_u + w * (guided_c - guided_u)
    want = eps_u + w * (eps_c - eps_u) + 2.0 * (eps_c - eps_1) + 1.5 * (eps_c - eps_2)
    if rescale:
        factor = rescale * eps_c.std(dim=(1, 2, 3), keepdim=True) / want.std(dim=(1, 2, 3), keepdim=True) + 1 - rescale
        want = want * factor
    torch.testing.assert_close(guided_u, eps_u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, want, atol=1e-4, rtol=1e-4)
    assert "forward" not in tr.__dict__


@pytest.mark.slow
@pytest.mark.parametrize("start, stop", [(0.01, 0.2), (0.0, 0.35)])
def test_slg_equals_diffusers_sd3_skip_layer_guidance(sd3, start, stop):
    """SLG on transformer_blocks.1 == StableDiffusion3Pipeline(skip_guidance_layers=[1]) with the same window."""
    call = tiny_spec("tiny/sd3").defaults | {"output_type": "pt", "num_inference_steps": 10}
    want = sd3("a red fox", generator=torch.Generator().manual_seed(0), skip_guidance_layers=[1],
               skip_layer_guidance_scale=2.8, skip_layer_guidance_start=start, skip_layer_guidance_stop=stop,
               **call).images
    baseline = sd3("a red fox", generator=torch.Generator().manual_seed(0), **call).images
    with mmattn.apply(sd3, SLG(layers="transformer_blocks.1", scale=2.8, start=start, stop=stop)):
        got = sd3("a red fox", generator=torch.Generator().manual_seed(0), **call).images
    assert (want - baseline).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_method_runs_changes_output_and_restores(name):
    """Three steps: SLG follows SD3's window n*start < i < n*stop, which never holds step 0."""
    pipe = pipe_for(name)
    layer = middle_layer(pipe)
    steps = {"num_inference_steps": 3}
    baseline = run(pipe, name, **steps)
    configs = [SEG(heads=f"{layer}:*", sigma=2.0), SEG(heads=f"{layer}:0,1", sigma=float("inf")),
               SLG(layers=layer, start=0.0, stop=1.0), STG(layers=layer, mode="residual"), STG(layers=layer, mode="attention"),
               [PAG(heads=layer), SEG(heads=layer, sigma=1.0), STG(layers=layer, mode="residual", scale=0.5)]]
    for config in configs:
        with mmattn.apply(pipe, config):
            out = run(pipe, name, **steps)
        assert (out - baseline).abs().max() > 1e-4, config
    assert torch.equal(run(pipe, name, **steps), baseline)
    assert "forward" not in diffusion_family(pipe).denoiser(pipe).__dict__


def test_stg_attention_mode_is_pag_on_every_head(sd3):
    with mmattn.apply(sd3, STG(layers="transformer_blocks.1", scale=2.0)):
        a = run(sd3)
    with mmattn.apply(sd3, PAG(heads="transformer_blocks.1:*", scale=2.0)):
        b = run(sd3)
    assert torch.equal(a, b)


def test_rescale_conflicts_fail_clearly(sd3):
    before = dict(sd3.transformer.attn_processors)
    with pytest.raises(ValueError, match="only one applied method may set rescale"):
        mmattn.apply(sd3, [STG(layers="transformer_blocks.1", rescale=0.5), STG(layers="transformer_blocks.2", rescale=0.5)])
    assert dict(sd3.transformer.attn_processors) == before and "forward" not in sd3.transformer.__dict__


@pytest.mark.parametrize("make, message", [
    (lambda: SEG(heads="transformer_blocks.0", sigma=0), r"sigma=0 is out of range: expected a number > 0"),
    (lambda: SLG(layers="transformer_blocks.0", start=0.5, stop=0.1), r"stop=0.1 is before start=0.5"),
    (lambda: STG(layers="transformer_blocks.0", mode="temporal"), r"mode='temporal': expected 'attention' or 'residual'"),
    (lambda: STG(layers="transformer_blocks.0", rescale=2), r"rescale=2 is out of range: expected a number in \[0.0, 1.0\]"),
])
def test_new_config_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("scope", SCOPES[2:])
@pytest.mark.parametrize("single", [False, True])
def test_flux_scopes_match_eager_oracle(scope, single):
    """Flux's [text, image] joint attention (double-stream and single-stream blocks): each scope's fused blend equals
    an eager core that materialises the map and perturbs the scope's block (``scoped_map``)."""
    transformer = pipe_for("tiny/flux").transformer
    block = transformer.single_transformer_blocks[0] if single else transformer.transformer_blocks[0]
    attn, n_text, n_image, heads, rows, u = block.attn, 5, 12, (0, 2), slice(1, 3), 0.6
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(3, n_image, 64, generator=g), torch.randn(3, n_text, 64, generator=g)
    if single:
        x, ctx = torch.cat([ctx, x], dim=1), None
    info = CallInfo(text_tokens=n_text)
    fused = PROCESSORS["flux"](attn.processor, info)
    fused.ops.append(HeadOp(Branch(1.0, 0.0, 1.0, rows=rows), torch.tensor(heads), "blend", u, scope=scope))

    def eager_core(query, key, value, attention_mask):  # (B, N, H, D)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        a = torch.softmax(scores, dim=-1)
        t = scoped_map(scores, a, n_image, text_first=True, scope=scope)
        for h in heads:
            a[rows, h] = (1 - u) * a[rows, h] + u * t[rows, h]
        return (a @ v).transpose(1, 2)

    oracle = PROCESSORS["flux"](attn.processor, info)
    oracle.core = eager_core
    with torch.no_grad():
        got, want = fused(attn, x, ctx), oracle(attn, x, ctx)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        plain = PROCESSORS["flux"](attn.processor, info)(attn, x, ctx)
    got, plain = (torch.cat([t.flatten() for t in (o if isinstance(o, tuple) else (o,))]) for o in (got, plain))
    assert not torch.allclose(got, plain)


def test_scopes_need_joint_attention():
    with pytest.raises(ValueError, match="scope='TT_mask' perturbs a block of joint \\[image, text\\] attention "
                                         "\\(sd3, flux, cogvideox, qwenimage, hunyuanvideo\\); wan has none: use scope='joint'"):
        mmattn.apply(pipe_for("tiny/wan"), SoftPAG(heads="blocks.0", scope="TT_mask"))
    for scope in ("II_mask", "image"):
        with pytest.raises(ValueError, match=f"scope='{scope}' perturbs one block of the map; target='uniform' applies"):
            SoftPAG(heads="x", scope=scope, target="uniform")


def test_scope_without_the_keys_it_needs_leaves_the_rows_unchanged():
    """A call without text tokens: II_mask (image queries see text keys only) has no key left and leaves the rows as
    they are; II_identity falls back to each query's own value."""
    from mmattn.processors.perturbation import _blend_scope

    g = torch.Generator().manual_seed(5)
    q, k, v, out = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(4))
    for scope, want in (("II_mask", out.clone()), ("II_identity", None)):
        op = HeadOp(Branch(1.0, 0.0, 1.0, rows=slice(1, 2)), torch.tensor([0, 2]), "blend", 1.0, scope=scope)
        got = out.clone()
        _blend_scope(got, q, k, v, op, n_image=6, heads_axis=1, text_first=False)
        if want is None:
            want = out.clone()
            want[1:2, [0, 2]] = v[1:2, [0, 2]]
        torch.testing.assert_close(got, want)
