"""Head-level perturbation ops (SoftPAG / PAG / SoftUG, SEG, STG) and block skips (SLG, STG).

The ops live in the family processors of :mod:`mmattn.processors.diffusion` and act on the rows of perturbed
branches only (``Branch.rows``): a blur op in the query slot (SEG), a blend op in the output slot (SoftPAG,
PAG, STG's attention mode). Several methods can share a layer; each is one op, applied in the order added.

SoftPAG's blend needs no kernel: with ``A' = (1-u)·A + u·I`` and ``I·V = V``, a head's output is
``(1-u)·attn(Q,K,V) + u·V``; the uniform target gives ``(1-u)·attn + u·mean_k(V)``. Families whose
originals call ``dispatch_attention_fn`` (Flux, Wan) keep doing so, with the user's backend choice.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmattn.adapters import DIFFUSION_FAMILIES, diffusion_family
from mmattn.api import installing, register_installer
from mmattn.configs import PAG, SEG, SLG, STG, SoftPAG
from mmattn.guidance import Branch, GuidedDenoiser
from mmattn.heads import resolve_heads
from mmattn.processors.diffusion import FamilyProcessor, check_mirrored, family_processor, heads_first


@dataclass(eq=False)
class HeadOp:
    """One method acting in one layer on one branch's rows and some heads.

    kind "blend": out ← (1-u)·out + u·target, target "identity" (V) or "uniform" (mean V) over the joint
    sequence, or with a ``scope`` other than "joint" the attention with one block of joint attention perturbed (see
    :class:`mmattn.SoftPAG`); kind "blur": image-token queries q ← (1-u)·q + u·blur(q).
    """

    branch: Branch
    heads: torch.Tensor
    kind: str
    strength: float = 1.0
    target: str = "identity"
    sigma: float = 0.0
    scope: str = "joint"

    def on_query(self, processor: FamilyProcessor, query: torch.Tensor, image: slice) -> torch.Tensor:
        """Query slot: a blur op blurs the image-token queries of its rows and heads (a new tensor)."""
        if self.kind != "blur" or self.branch.rows is None:
            return query
        query = query.clone()
        q = heads_first(query, processor.heads_axis)
        rows, heads = self.branch.rows, self.heads.to(q.device)
        selected = q[rows][:, heads]
        tokens = selected[:, :, image]
        grid = processor.info.layer_grid(tokens.shape[2])
        selected[:, :, image] = torch.lerp(tokens, gaussian_blur_tokens(tokens, grid, self.sigma), self.strength)
        q[rows, heads] = selected
        return query

    def on_output(self, processor: FamilyProcessor, out, query, key, value, n_image: int) -> None:
        """Output slot: a blend op moves its rows and heads toward its target, in place."""
        if self.kind != "blend" or self.branch.rows is None:
            return
        if self.scope != "joint":
            _blend_scope(out, query, key, value, self, n_image, processor.heads_axis, processor.text_first)
        else:
            blend(out, value, self, processor.heads_axis)


def blend(out: torch.Tensor, value: torch.Tensor, op: HeadOp, heads_axis: int = 1) -> None:
    """In place on ``out``: the op's rows and heads become (1-u)·out + u·target(V); heads on ``heads_axis``."""
    out, value = heads_first(out, heads_axis), heads_first(value, heads_axis)
    rows, heads = op.branch.rows, op.heads.to(out.device)
    v = value[rows][:, heads]
    if op.target == "uniform":
        v = v.mean(dim=2, keepdim=True)
    o = out[rows][:, heads]
    out[rows, heads] = torch.lerp(o, v.to(o.dtype).expand_as(o), op.strength)


INFINITE_SIGMA = 9999.0  # the official SEG code's threshold: a larger sigma means the mean query


def gaussian_blur_tokens(x: torch.Tensor, grid: tuple[int, int, int], sigma: float) -> torch.Tensor:
    """Blur (B, H, N, D) tokens laid out row-major as (frames, rows, cols) over rows and cols.

    The official SEG rule (SEG-SDXL ``pipeline_seg.py``): a Gaussian kernel of ceil(6σ) taps rounded up to odd,
    clipped to the grid side L (L if L is odd, L + 1 if even), reflect padding of half the kernel; σ = inf or
    σ > 9999 (the official "infinite" sentinel) gives the mean over each frame. Deviation: the official code
    clips by the width for both axes of its square grids; on a non-square grid each axis is clipped by its own
    length (the same on square grids).
    """
    b, h, n, d = x.shape
    frames, rows, cols = grid
    x = x.reshape(b * h, frames, rows, cols, d)
    if math.isinf(sigma) or sigma > INFINITE_SIGMA:
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x).reshape(b, h, n, d)
    planes = x.permute(0, 1, 4, 2, 3).reshape(-1, 1, rows, cols)  # one plane per (head, frame, channel)
    for axis, length in ((2, rows), (3, cols)):
        size = min(math.ceil(6 * sigma) | 1, length if length % 2 else length + 1)
        radius = size // 2
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
        kernel = (taps / taps.sum()).to(planes.dtype)
        if radius:
            pad = (0, 0, radius, radius) if axis == 2 else (radius, radius, 0, 0)
            padded = F.pad(planes, pad, mode="reflect")  # radius <= length // 2 < length by the clip above
            weight = kernel.view(1, 1, -1, 1) if axis == 2 else kernel.view(1, 1, 1, -1)
            planes = F.conv2d(padded, weight)
    x = planes.reshape(b * h, frames, d, rows, cols).permute(0, 1, 3, 4, 2)
    return x.reshape(b, h, n, d)


def _blend_scope(out, query, key, value, op: HeadOp, n_image: int, heads_axis: int, text_first: bool) -> None:
    """In place on ``out``: the op's rows and heads, for the scope's query group (image or text tokens), become
    (1-u)·attn + u·attn over the keys the scope leaves them (the other group's keys, and itself for an identity
    scope), from those scores alone under one shared max: no N×N matrix."""
    out_h, q, k, v = (heads_first(t, heads_axis) for t in (out, query, key, value))
    rows, heads = op.branch.rows, op.heads.to(out.device)
    q, k, v = (t[rows][:, heads] for t in (q, k, v))
    n = q.shape[2]
    image = slice(n - n_image, n) if text_first else slice(0, n_image)
    text = slice(0, n - n_image) if text_first else slice(n_image, n)
    groups = {"I": image, "T": text}
    queries = groups[op.scope[0]]
    if op.scope.endswith("identity"):  # the own group's block becomes the identity: itself and the other group
        seen, own = groups["T" if op.scope[0] == "I" else "I"], True
    else:  # the masked block's keys are gone: the keys of the other group than the block's
        seen, own = groups["T" if op.scope[1] == "I" else "I"], False
    scale = q.shape[-1] ** -0.5
    q_x = q[:, :, queries]
    scores = q_x @ k[:, :, seen].transpose(-1, -2) * scale
    if q_x.shape[2] == 0 or (scores.shape[-1] == 0 and not own):
        return  # no query of the scope, or no key left to attend to: the rows stay as they are
    m = scores.amax(-1, keepdim=True) if scores.shape[-1] else None
    if own:
        s_self = (q_x * k[:, :, queries]).sum(-1, keepdim=True) * scale
        m = s_self if m is None else torch.maximum(m, s_self)
    weights = torch.exp(scores - m)
    numerator, denominator = weights @ v[:, :, seen], weights.sum(-1, keepdim=True)
    if own:
        w_self = torch.exp(s_self - m)
        numerator, denominator = numerator + w_self * v[:, :, queries], denominator + w_self
    current = out_h[rows][:, heads]
    current[:, :, queries] = torch.lerp(current[:, :, queries], (numerator / denominator).to(out.dtype), op.strength)
    out_h[rows, heads] = current


def _skip_block_hook(family, branch: Branch):
    """Forward hook: the branch's rows of each block output become the block's matching input."""

    def hook(module, args, kwargs, output):
        if branch.rows is None:
            return output
        inputs = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        outputs = output if isinstance(output, tuple) else (output,)
        skipped = []
        for name, out in zip(family.block_outputs, outputs):
            x = inputs.get(name)
            if out is not None and isinstance(x, torch.Tensor):
                out = out.clone()
                out[branch.rows] = x[branch.rows].to(out.dtype)
            skipped.append(out)
        return tuple(skipped) if isinstance(output, tuple) else skipped[0]

    return hook


def install_perturbation(pipe, spec: str, branch: Branch, make_op=None, skip_blocks: bool = False,
                         field: str = "heads"):
    """Validate, then add one guidance branch: head ops on the selected layers and/or block skips.

    ``make_op(branch, heads) -> HeadOp`` builds the op for one layer's selected heads. A selected layer whose
    processor is not the diffusers processor ours mirrors (a user's own, an IP-Adapter's) is refused: its
    unperturbed rows could not go through it unchanged. Each change's undo is registered as it is made, so
    a failure at any step leaves the pipeline as it was. Returns undo.
    """
    family = diffusion_family(pipe)
    denoiser = family.denoiser(pipe)
    attention = family.attention_layers(denoiser)
    selection = resolve_heads(spec, {name: attn.heads for name, attn in attention.items()}, field)
    if not selection:
        raise ValueError(f"{field}={spec!r} selects no layer")
    if make_op is not None:
        check_mirrored(family, attention, selection)
    stages = family.denoisers(pipe)  # Wan 2.2: the same layers of both stages
    for other, _ in stages[1:]:
        if make_op is not None:
            check_mirrored(family, family.attention_layers(other), selection)
    branch.blocks = tuple(selection)
    with installing() as changes:
        for stage, cfg_scale in stages:
            guided = GuidedDenoiser.attach(pipe, family, stage, cfg_scale)
            changes.add(guided.release)
            guided.add_branch(branch)
            changes.add(functools.partial(guided.info.branches.remove, branch))
            attention, blocks = family.attention_layers(stage), family.blocks(stage)
            for name, heads in selection.items():
                if make_op is not None:
                    processor = family_processor(attention[name], family, guided.info, changes)
                    op = make_op(branch, torch.tensor(heads, dtype=torch.long))
                    processor.ops.append(op)
                    changes.add(functools.partial(processor.ops.remove, op))
                if skip_blocks:
                    hook = blocks[name].register_forward_hook(_skip_block_hook(family, branch), with_kwargs=True)
                    changes.add(hook.remove)
    return changes.undo


def _branch(config, **options) -> Branch:
    return Branch(config.scale, config.start, config.stop, batched=config.batch_branches, **options)


@register_installer(PAG)
@register_installer(SoftPAG)
def install_softpag(pipe, config: SoftPAG):
    family = diffusion_family(pipe)
    if config.scope != "joint" and not family.joint_attention:
        joint = ", ".join(f.name for f in DIFFUSION_FAMILIES if f.joint_attention)
        raise ValueError(f"scope={config.scope!r} perturbs a block of joint [image, text] attention ({joint}); "
                         f"{family.name} has none: use scope='joint'")
    scope = "II_identity" if config.scope == "image" else config.scope
    return install_perturbation(pipe, config.heads, _branch(config),
                                lambda branch, heads: HeadOp(branch, heads, "blend", config.strength, config.target,
                                                             scope=scope))


@register_installer(SEG)
def install_seg(pipe, config: SEG):
    return install_perturbation(pipe, config.heads, _branch(config),
                                lambda branch, heads: HeadOp(branch, heads, "blur", config.strength, sigma=config.sigma))


@register_installer(SLG)
def install_slg(pipe, config: SLG):
    branch = _branch(config, open_window=True)  # SD3's n*start < i < n*stop
    return install_perturbation(pipe, config.layers, branch, skip_blocks=True, field="layers")


@register_installer(STG)
def install_stg(pipe, config: STG):
    branch = _branch(config, rescale=config.rescale)
    if config.mode == "residual":
        return install_perturbation(pipe, config.layers, branch, skip_blocks=True, field="layers")
    return install_perturbation(pipe, config.layers, branch, lambda b, heads: HeadOp(b, heads, "blend", 1.0, "identity"),
                                field="layers")
