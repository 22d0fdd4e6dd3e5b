"""Guidance math for perturbation methods, applied by wrapping a pipeline's denoiser.

The wrapper appends a perturbed copy of the conditional rows to the denoiser's batch, so one forward
computes [uncond, cond, perturbed] (or [cond, perturbed] without CFG), and hands the pipeline the
conditional rows shifted so that the pipeline's own CFG step yields

    ε = ε_u + w·(ε_c − ε_u) + s·(ε_c − ε_p)        (it returns ε_c + (s/w)·(ε_c − ε_p) as "cond")

and, without a CFG batch (e.g. guidance-distilled Flux), ε = ε_c + s·(ε_c − ε_p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PerturbationState:
    """Shared by a model's processors: which batch rows are the perturbed branch right now."""

    rows: slice | None = None


def step_fraction(scheduler, timestep) -> float:
    """Fraction of the schedule already done at ``timestep`` (0 at the first step)."""
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or len(timesteps) == 0:
        return 0.0
    index = getattr(scheduler, "step_index", None)
    if index is None:
        t = torch.as_tensor(timestep).flatten()[0].to(timesteps.device, timesteps.dtype)
        hits = (timesteps == t).nonzero()
        index = int(hits[0]) if len(hits) else 0
    return index / len(timesteps)


class GuidedDenoiser:
    """Replaces ``denoiser.forward`` with a perturbed-guidance forward; ``restore()`` undoes it exactly."""

    def __init__(self, pipe, denoiser: torch.nn.Module, batched_inputs: tuple[str, ...], state: PerturbationState,
                 scale: float, start: float, stop: float):
        self.pipe, self.denoiser, self.batched_inputs, self.state = pipe, denoiser, batched_inputs, state
        self.scale, self.start, self.stop = scale, start, stop
        self._forward = denoiser.forward
        denoiser.forward = self

    def restore(self) -> None:
        if self.denoiser.__dict__.get("forward") is self:
            del self.denoiser.forward

    def _active(self, kwargs) -> bool:
        if self.scale == 0.0 or kwargs.get("skip_layers") is not None:
            return False
        done = step_fraction(self.pipe.scheduler, kwargs.get("timestep", 0))
        return self.start <= done < self.stop

    def __call__(self, *args, **kwargs):
        if args or not self._active(kwargs):
            return self._forward(*args, **kwargs)
        n = kwargs["hidden_states"].shape[0]
        cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        b = n // 2 if cfg else n
        for name in self.batched_inputs:
            x = kwargs.get(name)
            if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == n:
                kwargs[name] = torch.cat([x, x[n - b:]])
        self.state.rows = slice(n, n + b)
        try:
            output = self._forward(**kwargs)
        finally:
            self.state.rows = None
        sample = output[0] if isinstance(output, tuple) else output.sample
        main, perturbed = sample[:n], sample[n:]
        cond = main[n - b:]
        weight = self.scale / self.pipe.guidance_scale if cfg else self.scale
        main = torch.cat([main[: n - b], cond + weight * (cond - perturbed)])
        if isinstance(output, tuple):
            return (main, *output[1:])
        output.sample = main
        return output
