"""Guidance math for perturbation methods, applied by wrapping a pipeline's denoiser.

Each perturbation method applied to a pipeline is one *branch* k with scale s_k and a window
[start, stop) of the schedule. The wrapper appends one copy of the conditional rows per active
branch to the denoiser's batch, so a single forward computes [uncond, cond, pert_1, ..., pert_K]
(no uncond without CFG), and hands the pipeline conditional rows shifted so that its own CFG step
yields

    ε = ε_u + w·(ε_c − ε_u) + Σ_k s_k·(ε_c − ε_k)      (it returns ε_c + Σ_k (s_k/w)·(ε_c − ε_k))

and, without CFG (e.g. guidance-distilled Flux), ε = ε_c + Σ_k s_k·(ε_c − ε_k). Pipelines that call
the denoiser separately for cond and uncond (Wan) get the branches batched into the cond call.
An optional rescale r (STG, arXiv 2411.18664) replaces ε by ε·(r·std(ε_c)/std(ε) + 1 − r). A separate-call
family learns ε_u only in its second call: the cond call hands back ε_c + Σ_k (s_k/w)·(ε_c − ε_k), and the uncond
call hands back u' = (ε_rescaled − w·c')/(1 − w), so that the pipeline's u' + w·(c' − u') is the rescaled ε.

A pipeline's own ``guidance_rescale`` φ (SD, SDXL: arXiv 2305.08891) rescales toward std(c') of the rows it is
handed. So that it sees the true ε_c, the rows handed back are c' = ε_u + (α·ε − ε_u)/w with the per-sample α
that makes φ·std(c')/std(α·ε) + (1 − φ) equal φ·std(ε_c)/std(ε) + (1 − φ) (a quadratic in α, solved in closed
form): the pipeline's result is then the guided ε rescaled with std(ε_c).

The fork (DiT families, ``DiffusionFamily.fork_inputs``): blocks before the first perturbed one compute the same
thing for the conditional and the perturbed rows, so they run on [uncond, cond] only and the conditional rows are
copied into the perturbed ones where the first perturbed block starts. A UNet keeps the whole branch: its up
blocks read skip connections from every down block. With ``batch_branches=False`` on any active method, each
branch runs in its own forward on the conditional rows (less memory, the same result; no fork).

Whether a denoiser call carries CFG is decided from what the pipeline does in that call, not from an
attribute some pipelines lack (PixArt has no ``do_classifier_free_guidance``): while a method is
applied, the pipeline's ``__call__`` records its own arguments (prompt rows, the CFG scale the family
reads, negative prompts) and resets the per-call bookkeeping. A batched-CFG family guides when the
latent batch is twice the prompt rows; a separate-call family (Wan; Flux with ``true_cfg_scale``)
perturbs the first call of each step (cond) and passes the second (uncond / negative) through.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Branch:
    """One perturbed branch: its guidance term, and its batch rows while a forward runs.

    Step i of n guides when start <= i/n < stop, or with ``open_window`` when start < i/n < stop (SD3's own
    skip-layer guidance window, which SLG follows)."""

    scale: float
    start: float
    stop: float
    rescale: float = 0.0
    rows: slice | None = None
    open_window: bool = False
    batched: bool = True  # False: this branch's rows run in a forward of their own
    blocks: tuple[str, ...] = ()  # the blocks it perturbs (their names in DiffusionFamily.blocks)

    def covers(self, index: int, total: int) -> bool:
        if self.open_window:
            return total * self.start < index < total * self.stop
        return self.start <= index / total < self.stop


@dataclass
class PipelineCall:
    """What the running pipeline call asked for: ``rows`` prompt rows (prompts x images per prompt), the CFG
    ``scale`` w the family reads, and ``cfg``: whether a separate-call family runs an uncond call each step."""

    rows: int | None
    scale: float
    cfg: bool
    guidance_rescale: float = 0.0


@dataclass
class CallInfo:
    """What processors may need to know about the current denoiser call."""

    latent_shape: tuple[int, ...] = ()
    text_tokens: int = 0
    token_grid: tuple[int, int, int] | None = None  # (frames, rows, cols) of image tokens, when known
    grid_factors: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # the family's downsampling factors (DiffusionFamily)
    step: tuple[int, int] = (0, 1)  # (index, count) of the current denoising step
    branches: list[Branch] = field(default_factory=list)

    def layer_grid(self, n_tokens: int) -> tuple[int, int, int]:
        """The (frames, rows, cols) of a layer's ``n_tokens`` image tokens: the call's grid downsampled by one of
        the family's factors (a UNet's deeper blocks; a DiT keeps one resolution)."""
        if self.token_grid is None:
            raise ValueError("this method needs the image token grid, which this call does not reveal")
        frames, rows, cols = self.token_grid
        for factor in self.grid_factors:
            grid = (frames, -(-rows // factor), -(-cols // factor))
            if grid[0] * grid[1] * grid[2] == n_tokens:
                return grid
        raise ValueError(f"cannot lay {n_tokens} image tokens on a grid derived from {self.token_grid} "
                         f"(downsampling factors {self.grid_factors})")


def step_index(scheduler, timestep) -> tuple[int, int]:
    """(index of the current step, number of steps) of the scheduler's schedule."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        return 0, 1
    index = getattr(scheduler, "step_index", None)
    if index is None:
        t = torch.as_tensor(timestep).flatten()[0].to(timesteps.device, timesteps.dtype)
        hits = (timesteps == t).nonzero()
        index = int(hits[0]) if len(hits) else 0
    return index, len(timesteps)


def _expand(x, n: int, b: int, copies: int):
    """Append ``copies`` copies of the last ``b`` of ``n`` batch rows (tensors, dicts of tensors)."""
    if isinstance(x, dict):
        return {k: _expand(v, n, b, copies) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == n:
        return torch.cat([x] + [x[n - b:]] * copies)
    return x


def _take_last(x, n: int, b: int):
    """The last ``b`` of ``n`` batch rows (tensors, dicts of tensors)."""
    if isinstance(x, dict):
        return {k: _take_last(v, n, b) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == n:
        return x[n - b:]
    return x


def _pipeline_rescale_factor(uncond: torch.Tensor, cond: torch.Tensor, guided: torch.Tensor, w: float,
                             phi: float) -> torch.Tensor:
    """Per sample, the α for which a pipeline's ``rescale_noise_cfg(α·g, c', φ)`` with c' = u + (α·g − u)/w equals
    ``rescale_noise_cfg(g, ε_c, φ)``: with s(α)² = var(c') = a0 + a1·α + a2·α² (unbiased, as the pipeline's std),
    φ·s(α) = std(g)·(K − (1 − φ)·α), K = φ·std(ε_c)/std(g) + 1 − φ; of the roots, the one nearest 1 (α = 1 when
    there is no perturbation)."""
    dims = tuple(range(1, guided.ndim))
    size = math.prod(guided.shape[1:])
    a, g = (uncond * (1 - 1 / w)).double(), guided.double()
    a, g = a - a.mean(dim=dims, keepdim=True), g - g.mean(dim=dims, keepdim=True)
    var_a, var_g = (a * a).sum(dims) / (size - 1), (g * g).sum(dims) / (size - 1)
    cov = (a * g).sum(dims) / (size - 1)
    k = phi * cond.double().std(dim=dims) / var_g.sqrt() + 1 - phi
    qa = phi ** 2 * var_g / w ** 2 - var_g * (1 - phi) ** 2
    qb = phi ** 2 * 2 * cov / w + 2 * var_g * k * (1 - phi)
    qc = phi ** 2 * var_a - var_g * k ** 2
    disc = (qb * qb - 4 * qa * qc).clamp_min(0).sqrt()
    linear = qa.abs() < 1e-12 * (qb.abs() + qc.abs())
    safe = torch.where(linear, torch.ones_like(qa), qa)
    roots = torch.stack([(-qb + disc) / (2 * safe), (-qb - disc) / (2 * safe)])
    roots = torch.where(linear, -qc / qb, roots)
    valid = k - (1 - phi) * roots >= 0
    distance = torch.where(valid, (roots - 1).abs(), torch.full_like(roots, math.inf))
    alpha = roots.gather(0, distance.argmin(0, keepdim=True))[0]
    return alpha.to(guided.dtype).view(-1, *([1] * len(dims)))


def _map_block_inputs(fields: tuple[str, ...], fn):
    """A forward pre-hook (with kwargs) applying ``fn`` to the block arguments named in ``fields``."""
    signatures: dict[type, inspect.Signature] = {}

    def hook(module, args, kwargs):
        signature = signatures.setdefault(type(module), inspect.signature(type(module).forward))
        bound = signature.bind(module, *args, **kwargs)
        for name in fields:
            value = bound.arguments.get(name)
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                bound.arguments[name] = fn(value)
            elif isinstance(value, tuple) and all(isinstance(x, torch.Tensor) and x.ndim > 0 for x in value):
                bound.arguments[name] = tuple(fn(x) for x in value)  # a per-sample rotary (cos, sin): LTX
        return bound.args[1:], bound.kwargs

    return hook


def _rescale(eps: torch.Tensor, eps_cond: torch.Tensor, r: float) -> torch.Tensor:
    dims = tuple(range(1, eps.ndim))
    return eps * (r * eps_cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True) + 1 - r)


class GuidedDenoiser:
    """Replaces ``denoiser.forward`` with a perturbed-guidance forward shared by all branches.

    The replacement keeps the original's name, docstring and signature (``inspect.signature`` reads it
    through ``__wrapped__``): diffusers code that filters keyword arguments by the forward's signature
    passes the same arguments as without it.

    ``attach`` returns the pipeline's wrapper (creating it on first use); once its last branch is removed,
    ``release`` restores the original forward and pipeline class exactly.
    """

    fork = True  # run the blocks before the first perturbed one on [uncond, cond] only (DiT families)

    def __init__(self, pipe, denoiser: torch.nn.Module, family, cfg_scale: str | None = None):
        self.pipe, self.denoiser, self.family = pipe, denoiser, family
        self.cfg_scale = cfg_scale or family.cfg_scale  # the pipeline argument with this denoiser's w
        self.info = CallInfo()
        self._forward = denoiser.forward
        self._signature = inspect.signature(self._forward)
        self._step, self._calls_in_step = None, 0
        self._pending = None  # separate-call rescale: what the cond call left for the uncond call of its step
        self.call: PipelineCall | None = None  # set while the pipeline's __call__ runs
        self.holders = 0  # methods other than branches that read ``info`` (window attention)
        functools.update_wrapper(self, self._forward)
        denoiser.forward = self
        recording = type(pipe) in _RECORDING.values()  # another denoiser's wrapper swapped the class already
        self._pipe_class = type(pipe).__bases__[0] if recording else type(pipe)
        pipe.__class__ = _recording_class(type(pipe))

    @classmethod
    def attach(cls, pipe, family, denoiser=None, cfg_scale: str | None = None) -> GuidedDenoiser:
        """The wrapper of ``denoiser`` (default: the family's first), created on first use."""
        denoiser = family.denoiser(pipe) if denoiser is None else denoiser
        current = denoiser.__dict__.get("forward")
        return current if isinstance(current, cls) else cls(pipe, denoiser, family, cfg_scale)

    def add_branch(self, branch: Branch) -> None:
        if branch.rescale and any(b.rescale for b in self.info.branches):
            raise ValueError("only one applied method may set rescale; remove() the other first")
        self.info.branches.append(branch)

    def release(self) -> None:
        """With no branch and no holder left, put the original forward and pipeline class back."""
        if not self.info.branches and not self.holders and self.denoiser.__dict__.get("forward") is self:
            del self.denoiser.forward
            if type(self.pipe) is _RECORDING.get(self._pipe_class) and not _guided_of(self.pipe):
                self.pipe.__class__ = self._pipe_class

    def begin_call(self, arguments: dict) -> None:
        """The pipeline's ``__call__`` starts with ``arguments`` (its bound arguments, defaults applied)."""
        self._step, self._calls_in_step, self._pending = None, 0, None
        prompt, embeds = arguments.get("prompt"), arguments.get("prompt_embeds")
        per_prompt = arguments.get("num_images_per_prompt") or arguments.get("num_videos_per_prompt") or 1
        rows = embeds.shape[0] if isinstance(embeds, torch.Tensor) else (
            1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, (list, tuple)) else None)
        scale = float(arguments.get(self.family.cfg_scale, 1.0) or 1.0)
        negative = not self.family.cfg_needs_negative or any(
            arguments.get(name) is not None for name in ("negative_prompt", "negative_prompt_embeds"))
        own = arguments.get(self.cfg_scale)  # a second stage's own w (Wan 2.2's guidance_scale_2), else the first's
        self.call = PipelineCall(None if rows is None else rows * per_prompt, scale if own is None else float(own),
                                 scale > 1 and negative, float(arguments.get("guidance_rescale") or 0.0))

    def _cfg(self, n: int) -> tuple[bool, float]:
        """(this denoiser call's batch of ``n`` rows carries CFG / its pipeline runs an uncond call, w)."""
        call = self.call
        if call is None:  # the denoiser called outside a pipeline call: the pipeline's own attributes
            cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
            return cfg, (float(self.pipe.guidance_scale) if cfg else 1.0)
        if self.family.cfg_calls == "batched":
            cfg = call.scale > 1 and (n == 2 * call.rows if call.rows else n % 2 == 0)
        else:
            cfg = call.cfg
        return cfg, (call.scale if cfg else 1.0)

    def _active(self, inputs, cfg: bool) -> list[Branch]:
        """Branches inside their [start, stop); none on the uncond call of separate-CFG pipelines."""
        index, total = step_index(self.pipe.scheduler, inputs.get("timestep", 0))
        self._calls_in_step = self._calls_in_step + 1 if (index, total) == self._step else 0
        self._step = self.info.step = (index, total)
        if self.family.cfg_calls == "separate" and cfg and self._calls_in_step % 2 == 1:
            return []
        self._pending = None
        if inputs.get("skip_layers") is not None:
            return []
        return [b for b in self.info.branches if b.scale != 0.0 and b.covers(index, total)]

    def _describe_call(self, inputs) -> None:
        latent = inputs[self.family.batched_inputs[0]]
        text = inputs.get("encoder_hidden_states")
        self.info.latent_shape = tuple(latent.shape)
        self.info.text_tokens = text.shape[1] if isinstance(text, torch.Tensor) and text.ndim == 3 else 0
        self.info.token_grid = self.family.token_grid(self.denoiser, inputs)
        self.info.grid_factors = self.family.grid_factors

    def __call__(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        inputs = bound.arguments
        n = inputs[self.family.batched_inputs[0]].shape[0]
        cfg, w = self._cfg(n)
        active = self._active(inputs, cfg)
        self._describe_call(inputs)
        if not active:
            output = self._forward(*args, **kwargs)
            pending, self._pending = self._pending, None
            return output if pending is None else self._rescaled_uncond(output, *pending)
        batched_cfg = cfg and self.family.cfg_calls == "batched"
        b = n // 2 if batched_cfg else n
        if all(branch.batched for branch in active):
            output, sample, perturbed = self._batched_forward(bound, inputs, active, n, b)
        else:
            output, sample, perturbed = self._separate_forwards(bound, inputs, active, n, b)
        main = sample[:n]
        cond = main[n - b:]
        delta = sum(branch.scale * (cond - p) for branch, p in zip(active, perturbed))
        rescale = max(branch.rescale for branch in active)
        phi = self.call.guidance_rescale if self.call is not None and batched_cfg else 0.0
        if batched_cfg and (rescale or phi):  # the final ε, then the cond that makes the pipeline produce it
            uncond = main[: n - b]
            guided = uncond + w * (cond - uncond) + delta
            if rescale:
                guided = _rescale(guided, cond, rescale)
            if phi:
                guided = guided * _pipeline_rescale_factor(uncond, cond, guided, w, phi)
            new_cond = uncond + (guided - uncond) / w
        elif cfg and self.family.cfg_rescales_to_cond:  # the pipeline rescales to |ε_c|: keep it, move ε_u instead
            new_cond = cond
            self._pending = (cond, new_cond, delta, w, rescale)
        elif not rescale:
            new_cond = cond + delta / w
        elif cfg:  # separate calls: ε_u comes in the next call, which finishes the rescale (_rescaled_uncond)
            new_cond = cond + delta / w
            self._pending = (cond, new_cond, delta, w, rescale)
        else:  # no CFG: the pipeline uses this prediction as it is
            new_cond = _rescale(cond + delta, cond, rescale)
        main = torch.cat([main[: n - b], new_cond])
        if isinstance(output, tuple):
            return (main, *output[1:])
        output.sample = main
        return output

    @staticmethod
    def _rescaled_uncond(output, cond, new_cond, delta, w: float, rescale: float):
        """The uncond call's output u' for which the pipeline's u' + w·(c' − u') is the rescaled guided ε."""
        uncond = output[0] if isinstance(output, tuple) else output.sample
        guided = _rescale(uncond + w * (cond - uncond) + delta, cond, rescale)
        new_uncond = (guided - w * new_cond) / (1 - w)
        if isinstance(output, tuple):
            return (new_uncond, *output[1:])
        output.sample = new_uncond
        return output

    def _batched_forward(self, bound, inputs, active: list[Branch], n: int, b: int):
        """One forward over [uncond, cond, pert_1, ...]; forked at the first perturbed block where the family
        allows it. Returns (output, its sample, the perturbed rows of each branch)."""
        for name in self.family.batched_inputs:
            if name in inputs:
                inputs[name] = _expand(inputs[name], n, b, len(active))
        for i, branch in enumerate(active):
            branch.rows = slice(n + i * b, n + (i + 1) * b)
        hooks = self._fork_hooks(inputs, active, n, b)
        try:
            output = self._forward(*bound.args, **bound.kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            for branch in active:
                branch.rows = None
        sample = output[0] if isinstance(output, tuple) else output.sample
        return output, sample, [sample[n + i * b: n + (i + 1) * b] for i in range(len(active))]

    def _separate_forwards(self, bound, inputs, active: list[Branch], n: int, b: int):
        """The unperturbed forward, then one forward per branch on the conditional rows alone."""
        output = self._forward(*bound.args, **bound.kwargs)
        sample = output[0] if isinstance(output, tuple) else output.sample
        original = dict(inputs)
        perturbed = []
        for branch in active:
            for name in self.family.batched_inputs:
                if name in original:
                    inputs[name] = _take_last(original[name], n, b)
            branch.rows = slice(0, b)
            try:
                out = self._forward(*bound.args, **bound.kwargs)
            finally:
                branch.rows = None
            perturbed.append(out[0] if isinstance(out, tuple) else out.sample)
        return output, sample, perturbed

    def _fork_hooks(self, inputs, active: list[Branch], n: int, b: int) -> list:
        """Pre-hooks that run the blocks before the first perturbed one on the first ``n`` rows and copy the
        conditional rows into the perturbed ones at that block (none where the family keeps the whole branch,
        a ControlNet adds residuals between blocks, or the first block is perturbed)."""
        fields = self.family.fork_inputs
        if not (self.fork and fields) or any(inputs.get(name) is not None for name in _CONTROLNET_INPUTS):
            return []
        blocks = list(self.family.blocks(self.denoiser).items())
        perturbed = {name for branch in active for name in branch.blocks}
        first = next((i for i, (name, _) in enumerate(blocks) if name in perturbed), 0)
        if first == 0:
            return []
        total, copies = n + b * len(active), len(active)
        trim = _map_block_inputs(fields, lambda x: x[:n] if x.shape[0] == total else x)
        fork = _map_block_inputs(fields, lambda x: torch.cat([x] + [x[n - b:n]] * copies) if x.shape[0] == n else x)
        hooks = []
        try:
            for _, block in blocks[:first]:
                hooks.append(block.register_forward_pre_hook(trim, with_kwargs=True))
            hooks.append(blocks[first][1].register_forward_pre_hook(fork, with_kwargs=True))
        except BaseException:
            for hook in hooks:
                hook.remove()
            raise
        return hooks


# Denoiser inputs that add residuals between blocks (ControlNet): the fork is off when one is given.
_CONTROLNET_INPUTS = ("block_controlnet_hidden_states", "controlnet_block_samples", "controlnet_single_block_samples",
                      "down_block_additional_residuals", "mid_block_additional_residual")


_RECORDING: dict[type, type] = {}  # pipeline class -> its subclass whose __call__ records the call


def _recording_class(cls: type) -> type:
    """A subclass of pipeline class ``cls`` (same name, same signature) whose ``__call__`` tells the pipeline's
    GuidedDenoiser what the call asked for before running the original. Dunder calls are looked up on the type,
    so the pipeline's class is swapped while a method is applied (``release`` swaps it back)."""
    if cls in _RECORDING.values():
        return cls
    if cls not in _RECORDING:
        original = cls.__call__
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __call__(self, *args, **kwargs):
            wrappers = _guided_of(self)
            if not wrappers:
                return original(self, *args, **kwargs)
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            for guided in wrappers:
                guided.begin_call(bound.arguments)
            try:
                return original(self, *args, **kwargs)
            finally:
                for guided in wrappers:
                    guided.call = None

        _RECORDING[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                       "__qualname__": cls.__qualname__})
    return _RECORDING[cls]


def _guided_of(pipe) -> list[GuidedDenoiser]:
    """The wrappers on the pipeline's denoisers (Wan 2.2: both stages)."""
    from .adapters import diffusion_family

    forwards = [denoiser.__dict__.get("forward") for denoiser, _ in diffusion_family(pipe).denoisers(pipe)]
    return [forward for forward in forwards if isinstance(forward, GuidedDenoiser)]
