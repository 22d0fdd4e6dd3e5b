"""Guidance math for perturbation methods, applied by wrapping a pipeline's denoiser.

The wrapper appends a perturbed copy of the conditional rows to the denoiser's batch, so one forward
computes [uncond, cond, perturbed] (or [cond, perturbed] without CFG), and hands the pipeline the
conditional rows shifted so that the pipeline's own CFG step yields

    ε = ε_u + w·(ε_c − ε_u) + s·(ε_c − ε_p)        (it returns ε_c + (s/w)·(ε_c − ε_p) as "cond")

and, without CFG (e.g. guidance-distilled Flux), ε = ε_c + s·(ε_c − ε_p). Pipelines that call the
denoiser separately for cond and uncond (Wan) get the perturbed branch batched into the cond call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch


@dataclass
class PerturbationState:
    """Shared by a model's processors: which batch rows are the perturbed branch right now."""

    rows: slice | None = None


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


def _expand(x, n: int, b: int):
    """Append the last ``b`` of ``n`` batch rows to ``x`` (tensors with a batch dim, dicts of them)."""
    if isinstance(x, dict):
        return {k: _expand(v, n, b) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == n:
        return torch.cat([x, x[n - b:]])
    return x


class GuidedDenoiser:
    """Replaces ``denoiser.forward`` with a perturbed-guidance forward; ``restore()`` undoes it exactly."""

    def __init__(self, pipe, denoiser: torch.nn.Module, family, state: PerturbationState,
                 scale: float, start: float, stop: float):
        self.pipe, self.denoiser, self.family, self.state = pipe, denoiser, family, state
        self.scale, self.start, self.stop = scale, start, stop
        self._forward = denoiser.forward
        self._signature = inspect.signature(self._forward)
        self._step, self._calls_in_step = None, 0
        denoiser.forward = self

    def restore(self) -> None:
        if self.denoiser.__dict__.get("forward") is self:
            del self.denoiser.forward

    def _cfg(self) -> bool:
        return bool(getattr(self.pipe, "do_classifier_free_guidance", False))

    def _active(self, inputs) -> bool:
        """Inside [start, stop) of the schedule, and (separate CFG calls) this is the step's cond call."""
        index, total = step_index(self.pipe.scheduler, inputs.get("timestep", 0))
        key = (index, total)
        self._calls_in_step = self._calls_in_step + 1 if key == self._step else 0
        self._step = key
        if self.family.cfg_calls == "separate" and self._cfg() and self._calls_in_step % 2 == 1:
            return False  # the uncond call of this step
        if self.scale == 0.0 or inputs.get("skip_layers") is not None:
            return False
        return self.start <= index / total < self.stop

    def __call__(self, *args, **kwargs):
        bound = self._signature.bind(*args, **kwargs)
        inputs = bound.arguments
        if not self._active(inputs):
            return self._forward(*args, **kwargs)
        n = inputs[self.family.batched_inputs[0]].shape[0]
        cfg = self._cfg() and self.family.cfg_calls == "batched"
        b = n // 2 if cfg else n
        for name in self.family.batched_inputs:
            if name in inputs:
                inputs[name] = _expand(inputs[name], n, b)
        self.state.rows = slice(n, n + b)
        try:
            output = self._forward(*bound.args, **bound.kwargs)
        finally:
            self.state.rows = None
        sample = output[0] if isinstance(output, tuple) else output.sample
        main, perturbed = sample[:n], sample[n:]
        cond = main[n - b:]
        weight = self.scale / self.pipe.guidance_scale if self._cfg() else self.scale
        main = torch.cat([main[: n - b], cond + weight * (cond - perturbed)])
        if isinstance(output, tuple):
            return (main, *output[1:])
        output.sample = main
        return output
