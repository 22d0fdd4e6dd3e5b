"""SoftPAG on the tiny SD3: eager-attention oracle, guidance math, identities, exact restore."""

import pytest
import torch

import mmattn
from mmattn import SoftPAG
from mmattn.guidance import PerturbationState
from mmattn.processors.perturbation import SoftPAGJointAttnProcessor
from mmattn.testing import build_tiny


@pytest.fixture(scope="module")
def sd3():
    return build_tiny("tiny/sd3")


def run(pipe, seed=0, **kwargs):
    call = {"height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": 5.0, "output_type": "pt"} | kwargs
    return pipe("a red fox", generator=torch.Generator().manual_seed(seed), **call).images


def eager_joint_attention(attn, x, ctx, heads, u, target, rows):
    """Oracle: materialise A per head, blend the perturbed rows' selected heads, then A·V."""
    b, n = x.shape[:2]

    def split(t):
        return t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

    def norm(f, t):
        return t if f is None else f(t)

    q = torch.cat([norm(attn.norm_q, split(attn.to_q(x))), norm(attn.norm_added_q, split(attn.add_q_proj(ctx)))], 2)
    k = torch.cat([norm(attn.norm_k, split(attn.to_k(x))), norm(attn.norm_added_k, split(attn.add_k_proj(ctx)))], 2)
    v = torch.cat([split(attn.to_v(x)), split(attn.add_v_proj(ctx))], 2)
    a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    size = a.shape[-1]
    t = torch.eye(size) if target == "identity" else torch.full((size, size), 1.0 / size)
    for h in heads:
        a[rows, h] = (1 - u) * a[rows, h] + u * t
    o = (a @ v).transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
    out, ctx_out = o[:, :n], o[:, n:]
    return attn.to_out[0](out), (attn.to_add_out(ctx_out) if not attn.context_pre_only else ctx_out)


@pytest.mark.parametrize("u, target, heads", [(1.0, "identity", (0, 3)), (0.4, "identity", (1,)), (0.7, "uniform", (0, 1, 2, 3))])
def test_processor_matches_eager_oracle(sd3, u, target, heads):
    attn = sd3.transformer.transformer_blocks[1].attn
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(3, 17, 32, generator=g), torch.randn(3, 9, 32, generator=g)
    state = PerturbationState(rows=slice(1, 3))
    with torch.no_grad():
        got = SoftPAGJointAttnProcessor(heads, u, target, state)(attn, x, ctx)
        want = eager_joint_attention(attn, x, ctx, heads, u, target, slice(1, 3))
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


def test_strength_zero_equals_baseline(sd3):
    baseline = run(sd3)
    with mmattn.apply(sd3, SoftPAG(heads="transformer_blocks.0-3:*", strength=0.0, scale=3.0)):
        zero = run(sd3)
    torch.testing.assert_close(zero, baseline, atol=1e-5, rtol=0)


def test_scale_changes_output_and_remove_restores_bit_identical(sd3):
    baseline = run(sd3)
    handle = mmattn.apply(sd3, SoftPAG(heads="transformer_blocks.2:*", strength=1.0, scale=3.0))
    perturbed = run(sd3)
    handle.remove()
    after = run(sd3)
    assert (perturbed - baseline).abs().max() > 1e-3
    assert torch.equal(after, baseline)
    assert "forward" not in sd3.transformer.__dict__


def test_batch_of_two_equals_two_runs(sd3):
    config = SoftPAG(heads="transformer_blocks.1:1,3", strength=0.5, scale=2.0)
    with mmattn.apply(sd3, config):
        batch = sd3(["a red fox", "a blue car"], generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                    height=32, width=32, num_inference_steps=2, guidance_scale=5.0, output_type="pt").images
        single = torch.cat([sd3(p, generator=torch.Generator().manual_seed(s), height=32, width=32, num_inference_steps=2,
                                guidance_scale=5.0, output_type="pt").images for p, s in (("a red fox", 0), ("a blue car", 1))])
    torch.testing.assert_close(batch, single, atol=1e-4, rtol=0)


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
