"""SoftPAG: eager and diffusers oracles, guidance math, identities and exact restore on every family."""

import pytest
import torch
from diffusers import StableDiffusionPAGPipeline

import mmattn
from mmattn import SoftPAG
from mmattn.guidance import PerturbationState
from mmattn.processors.perturbation import SoftPAGJointAttnProcessor
from mmattn.adapters import diffusion_family
from mmattn.testing import build_tiny, tiny_spec

FAMILIES = ["tiny/sd", "tiny/sd3", "tiny/flux", "tiny/wan", "tiny/pixart"]
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
    return out.frames if name == "tiny/wan" else out.images


def middle_layer(pipe):
    family = diffusion_family(pipe)
    layers = list(family.attention_layers(family.denoiser(pipe)))
    return layers[len(layers) // 2]


def eager_joint_attention(attn, x, ctx, heads, u, target, rows, scope="joint"):
    """Oracle: materialise A per head, blend the perturbed rows' selected heads, then A·V."""
    b, n = x.shape[:2]

    def split(t):
        return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

    def norm(f, t):
        return t if f is None else f(t)

    q = torch.cat([norm(attn.norm_q, split(attn.to_q(x))), norm(attn.norm_added_q, split(attn.add_q_proj(ctx)))], 2)
    k = torch.cat([norm(attn.norm_k, split(attn.to_k(x))), norm(attn.norm_added_k, split(attn.add_k_proj(ctx)))], 2)
    v = torch.cat([split(attn.to_v(x)), split(attn.add_v_proj(ctx))], 2)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    a = torch.softmax(scores, dim=-1)
    size = a.shape[-1]
    if scope == "image":  # image rows: identity within the image block, text keys as they are
        mask = torch.zeros(size, size)
        mask[:n, :n] = float("-inf")
        mask[:n, :n].fill_diagonal_(0)
        t = torch.softmax(scores + mask, dim=-1)
        t[:, :, n:] = a[:, :, n:]
    else:
        t = torch.eye(size) if target == "identity" else torch.full((size, size), 1.0 / size)
    for h in heads:
        a[rows, h] = (1 - u) * a[rows, h] + u * (t[rows, h] if scope == "image" else t)
    o = (a @ v).transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
    out, ctx_out = o[:, :n], o[:, n:]
    return attn.to_out[0](out), (attn.to_add_out(ctx_out) if not attn.context_pre_only else ctx_out)


@pytest.mark.parametrize("u, target, heads, scope", [(1.0, "identity", (0, 3), "joint"), (0.4, "identity", (1,), "joint"),
                                                     (0.7, "uniform", (0, 1, 2, 3), "joint"), (0.6, "identity", (0, 2), "image")])
def test_processor_matches_eager_oracle(sd3, u, target, heads, scope):
    attn = sd3.transformer.transformer_blocks[1].attn
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(3, 17, 32, generator=g), torch.randn(3, 9, 32, generator=g)
    state = PerturbationState(rows=slice(1, 3))
    with torch.no_grad():
        got = SoftPAGJointAttnProcessor(heads, u, target, state, scope=scope)(attn, x, ctx)
        want = eager_joint_attention(attn, x, ctx, heads, u, target, slice(1, 3), scope)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    # rows outside the perturbed slice are the unmodified attention
    with torch.no_grad():
        plain = eager_joint_attention(attn, x, ctx, heads, 0.0, target, slice(0, 0))
    torch.testing.assert_close(got[0][:1], plain[0][:1], atol=2e-5, rtol=1e-4)


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
            state = tr.transformer_blocks[1].attn.processor.state
            state.rows = slice(0, 1)  # perturb the single conditional row, run alone
            cond_only = {k: (v[1:] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
            eps_p = tr.forward._forward(**cond_only)[0]  # the unwrapped forward, perturbed rows = all
            state.rows = None
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
    ours = mmattn.processors.perturbation.PROCESSORS[family.name]((0, 1), 1.0, "identity", PerturbationState(), original)
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
        ours = mmattn.processors.perturbation.PROCESSORS[family.name](heads, u, target, PerturbationState(rows=slice(0, batch)), attn.processor)
        with torch.no_grad():
            got = ours(attn, *args, **kwargs)
            monkeypatch.setattr(diffusers_module, "dispatch_attention_fn", blended)
            want = attn.processor(attn, *args, **kwargs)
            monkeypatch.setattr(diffusers_module, "dispatch_attention_fn", real)
        for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_layer_level_pag_equals_diffusers_sd_pag_pipeline():
    """SoftPAG u=1 on every head of the UNet mid block == StableDiffusionPAGPipeline(pag_applied_layers=["mid"])."""
    pipe = pipe_for("tiny/sd")
    pag = StableDiffusionPAGPipeline(**pipe.components, pag_applied_layers=["mid"])
    call = tiny_spec("tiny/sd").defaults | {"output_type": "pt", "guidance_scale": 7.5}
    want = pag("a red fox", generator=torch.Generator().manual_seed(0), pag_scale=3.0, **call).images
    with mmattn.apply(pipe, SoftPAG(heads="mid_block.attentions.0.transformer_blocks.0:*", strength=1.0, scale=3.0)):
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


def test_image_scope_only_on_sd3():
    with pytest.raises(ValueError, match="scope='image' is supported on sd3 only; this pipeline is flux"):
        mmattn.apply(pipe_for("tiny/flux"), SoftPAG(heads="transformer_blocks.0", scope="image"))
    with pytest.raises(ValueError, match="scope='image' perturbs with the identity map"):
        SoftPAG(heads="transformer_blocks.0", scope="image", target="uniform")
