"""Method configurations: small frozen dataclasses, validated at construction.

Each config names one intervention and its settings; ``mmattn.apply`` turns it into processors and
hooks on a model. Errors name the field, the value and the valid range.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .heads import parse_heads


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is out of range: expected a number in [{lo}, {hi}]")


@dataclass(frozen=True)
class SoftPAG:
    """Soft perturbed-attention guidance on selected heads.

    HeadHunter / SoftPAG (arXiv 2506.10978), generalising PAG (arXiv 2403.17377). In the perturbed
    branch each selected head's attention map becomes ``(1-u)·A + u·T`` with T the identity
    (``target="identity"``: output ``(1-u)·attn + u·V``, PAG at u=1) or the uniform map
    (``target="uniform"``: output ``(1-u)·attn + u·mean(V)``, SoftUG). ``scope="joint"`` perturbs
    the whole joint [image, text] sequence; ``scope="image"`` (SD3) perturbs only the image×image
    block as diffusers' SD3 PAG does: image queries see themselves and all text keys. Guidance adds
    ``scale·(ε_c − ε_perturbed)`` between ``start`` and ``stop`` (fractions of the denoising steps).
    No N×N matrix is formed: the blend acts on the fused attention output.
    """

    heads: str
    strength: float = 1.0
    scale: float = 3.0
    target: str = "identity"
    start: float = 0.0
    stop: float = 1.0
    scope: str = "joint"

    name = "softpag"

    def __post_init__(self) -> None:
        parse_heads(self.heads)
        _check_range("strength", self.strength, 0.0, 1.0)
        _check_range("scale", self.scale, 0.0, 100.0)
        _check_range("start", self.start, 0.0, 1.0)
        _check_range("stop", self.stop, 0.0, 1.0)
        if self.target not in ("identity", "uniform"):
            raise ValueError(f"target={self.target!r}: expected 'identity' or 'uniform'")
        if self.scope not in ("joint", "image"):
            raise ValueError(f"scope={self.scope!r}: expected 'joint' or 'image'")
        if self.scope == "image" and self.target != "identity":
            raise ValueError(f"scope='image' perturbs with the identity map; got target={self.target!r}")
        if self.stop < self.start:
            raise ValueError(f"stop={self.stop} is before start={self.start}: expected start <= stop")

    def to_dict(self) -> dict:
        return {"method": self.name, **asdict(self)}


@dataclass(frozen=True)
class PAG(SoftPAG):
    """Perturbed-attention guidance (arXiv 2403.17377): identity attention on the selected heads.

    SoftPAG at strength 1. Unlike diffusers' PAG, layers are matched exactly and heads can be chosen.
    """

    name = "pag"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strength != 1.0 or self.target != "identity":
            raise ValueError(f"PAG is SoftPAG with strength=1 and target='identity'; got strength={self.strength}, "
                             f"target={self.target!r}: use SoftPAG for other settings")
