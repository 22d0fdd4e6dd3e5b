"""Public entry points: ``apply(model_or_pipe, methods) -> Handle`` and ``Handle.remove()``.

    with mmattn.apply(pipe, SoftPAG(heads="transformer_blocks.2:0,3", strength=0.5)):
        image = pipe(prompt).images[0]
    # processors and forwards are the original objects again: outputs are bit-identical

Each method config type has an installer (registered by its processor module) that validates
everything first, then changes the model and returns the function that undoes its changes. An
installer registers each change's undo in a ``Changes`` as soon as the change is made (``installing()``),
so an exception or Ctrl-C at any step undoes exactly what was done; if any method fails, the ones
installed before it are undone too: nothing is left half-applied.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ._compat import check_versions

Installer = Callable[[Any, Any], Callable[[], None]]
_INSTALLERS: dict[type, Installer] = {}


def register_installer(config_type: type):
    """Decorator: ``installer(target, config) -> undo`` for configs of ``config_type``."""

    def decorator(installer: Installer) -> Installer:
        _INSTALLERS[config_type] = installer
        return installer

    return decorator


class Changes:
    """The undo functions of the changes an installer has made so far; ``undo()`` runs them newest first."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def add(self, undo: Callable[[], None]) -> None:
        """Register the undo of a change just made (call it right after the change, before the next one)."""
        self._undo.append(undo)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


@contextmanager
def installing() -> Iterator[Changes]:
    """``with installing() as changes: ...; return changes.undo``: on any exception (Ctrl-C included) inside
    the block, the changes registered so far are undone before it propagates."""
    changes = Changes()
    try:
        yield changes
    except BaseException:
        changes.undo()
        raise


class Handle:
    """What ``apply`` did; ``remove()`` (or leaving the ``with`` block) restores the originals."""

    def __init__(self, methods: Sequence[Any]):
        self.methods = tuple(methods)
        self._undo: list[Callable[[], None]] = []

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._undo else "removed"
        return f"Handle({', '.join(type(m).__name__ for m in self.methods)}; {state})"


def _compiled(module: Any) -> bool:
    """A ``torch.compile(module)`` wrapper (nothing is one before torch._dynamo is imported)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def _check_target(target: Any) -> None:
    """Refuse what apply() cannot patch, saying what to pass instead."""
    from diffusers import ModelMixin

    from .adapters import DIFFUSION_FAMILIES
    from .testing import TinyVLM

    name = type(target).__name__
    if _compiled(target):
        inner = type(target._orig_mod).__name__
        raise TypeError(f"apply() got an OptimizedModule (torch.compile of {inner}), whose forward mmattn cannot patch: "
                        f"compile in place with module.compile() instead of module = torch.compile(module)"
                        + (", and pass the pipeline" if isinstance(target._orig_mod, ModelMixin) else ""))
    if isinstance(target, ModelMixin):
        attr = next((f.denoiser_attr for f in DIFFUSION_FAMILIES if f.denoiser_class == name), "transformer")
        raise TypeError(f"apply() got a {name}, a part of a diffusers pipeline; pass the pipeline that holds it "
                        f"(mmattn.apply(pipe, ...), not mmattn.apply(pipe.{attr}, ...)): guidance runs in the pipeline call")
    if isinstance(target, TinyVLM):
        raise TypeError(f"apply() got a {name}, which holds a model and its processor; pass its .model "
                        "(mmattn.apply(vlm.model, ...))")
    for attr in ("unet", "transformer"):
        if _compiled(getattr(target, attr, None)):
            inner = type(getattr(target, attr)._orig_mod).__name__
            raise ValueError(f"{name}.{attr} is an OptimizedModule (torch.compile of {inner}), whose forward mmattn "
                             f"cannot patch: keep the module and compile it in place, pipe.{attr}.compile(), instead of "
                             f"pipe.{attr} = torch.compile(pipe.{attr})")


def apply(target: Any, methods: Any | Sequence[Any]) -> Handle:
    """Install one method config or a list of them on a diffusers pipeline or transformers model.

    Warns once per process when transformers or diffusers lies outside the range mmattn is tested with."""
    check_versions()
    methods = list(methods) if isinstance(methods, (list, tuple)) else [methods]
    handle = Handle(methods)
    for method in methods:
        if type(method) not in _INSTALLERS:
            known = ", ".join(sorted(t.__name__ for t in _INSTALLERS))
            raise TypeError(f"{type(method).__name__} is not an mmattn method; known methods: {known}")
    _check_target(target)
    try:
        for method in methods:
            handle._undo.append(_INSTALLERS[type(method)](target, method))
    except BaseException:
        handle.remove()
        raise
    return handle
