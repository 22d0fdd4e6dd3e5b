"""Method configurations: small frozen dataclasses, validated at construction.

Each config names one intervention and its settings; ``mmattn.apply`` turns it into processors and
hooks on a model. Errors name the field, the value and the valid range.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

from .heads import parse_heads


class ConfigTypeError(TypeError, ValueError):
    """A config field of the wrong type (a string or a bool for a number). Also a ValueError, so code that catches
    invalid settings as ValueError catches it too."""


def _number(name: str, value) -> None:
    """Python and NumPy ints and floats are numbers; bools and strings are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        kind = "a bool" if isinstance(value, bool) else type(value).__name__
        raise ConfigTypeError(f"{name}={value!r}: expected a number, got {kind}")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    _number(name, value)
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} is out of range: expected a number in [{lo}, {hi}]")


def _plain_numbers(config) -> None:
    """Store NumPy scalars as Python ints and floats (JSON-ready, equal hashes)."""
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, bool) or type(value) in (int, float):
            continue
        if isinstance(value, numbers.Integral):
            object.__setattr__(config, f.name, int(value))
        elif isinstance(value, numbers.Real):
            object.__setattr__(config, f.name, float(value))


def _check_window(start: float, stop: float) -> None:
    _check_range("start", start, 0.0, 1.0)
    _check_range("stop", stop, 0.0, 1.0)
    if stop < start:
        raise ValueError(f"stop={stop} is before start={start}: expected start <= stop")


_REGISTRY: dict[str, type] = {}  # method name -> config class (see mmattn.methods)


def _setting(default, help: str, choices: tuple | None = None):
    """A config field with what a command line or a demo control shows for it (``help``, ``choices``)."""
    return field(default=default, metadata={"help": help, "choices": choices})


_SCALE = "perturbation guidance scale s in [0, 100]"
_START = "first fraction of the denoising steps with guidance, in [0, 1]"
_STOP = "fraction of the denoising steps where guidance stops, in [0, 1]"


class _Method:
    """Common to method configs: a name, the kind of model it applies to (``applies_to``: "diffusion" or "vlm"), a
    JSON-ready description. A subclass that sets its own ``name`` registers itself under it."""

    name = "method"
    applies_to = "diffusion"
    fixed: tuple[str, ...] = ()  # inherited fields this method does not let a user set (PAG: strength, target)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in _REGISTRY:
                raise ValueError(f"method name {cls.name!r} is taken by {_REGISTRY[cls.name].__name__}")
            _REGISTRY[cls.name] = cls

    def to_dict(self) -> dict:
        """Settings for JSON: non-finite numbers (SEG's sigma=inf) are written as strings."""
        fields = {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}
        return {"method": self.name, **fields}


@dataclass(frozen=True)
class _Guidance(_Method):
    """Common to the perturbation-guidance configs: how the perturbed branch runs (``batch_branches``; a keyword)."""

    batch_branches: bool = field(default=True, kw_only=True, metadata={
        "help": "run the perturbed branch in the denoiser's batch (forked at the first perturbed block on DiTs); "
                "false: in a forward of its own (less memory, same result)", "choices": None})

    def __post_init__(self) -> None:
        _plain_numbers(self)
        if not isinstance(self.batch_branches, bool):
            raise ConfigTypeError(f"batch_branches={self.batch_branches!r}: expected True or False")


SCOPES = ("joint", "image", "II_identity", "II_mask", "IT_mask", "TI_mask", "TT_mask", "TT_identity")


@dataclass(frozen=True)
class SoftPAG(_Guidance):
    """Soft perturbed-attention guidance on selected heads.

    HeadHunter / SoftPAG (arXiv 2506.10978), generalising PAG (arXiv 2403.17377). In the perturbed
    branch each selected head's attention map becomes ``(1-u)·A + u·T`` with T the identity
    (``target="identity"``: output ``(1-u)·attn + u·V``, PAG at u=1) or the uniform map
    (``target="uniform"``: output ``(1-u)·attn + u·mean(V)``, SoftUG). ``scope="joint"`` (default, HeadHunter's
    ``attention_identity``) perturbs the whole joint [image, text] sequence. On joint attention (SD3, Flux) the
    other scopes perturb one block of the map, as the official HeadHunter code's logit perturbations do
    (cvlab-kaist/HeadHunter, ``skip_attention``): that block's logits become -inf, rows re-normalised, then
    blended by u. ``"II_identity"`` (alias ``"image"``, diffusers' SD3 PAG): image queries see themselves and all
    text keys; ``"TT_identity"``: text queries see themselves and all image keys; ``"II_mask"`` / ``"IT_mask"``:
    image queries lose the image / text keys; ``"TI_mask"`` / ``"TT_mask"``: text queries lose the image / text
    keys (I = image, T = text; query group first). Guidance adds
    ``scale·(ε_c − ε_perturbed)`` between ``start`` and ``stop`` (fractions of the denoising steps).
    No N×N matrix is formed: the blend acts on the fused attention output.
    """

    heads: str
    strength: float = _setting(1.0, "blend u in [0, 1] toward the target map (1 = PAG)")
    scale: float = _setting(3.0, _SCALE)
    target: str = _setting("identity", "target map: identity (PAG) or uniform (SoftUG)", ("identity", "uniform"))
    start: float = _setting(0.0, _START)
    stop: float = _setting(1.0, _STOP)
    scope: str = _setting("joint", "joint sequence, or one block of joint attention (HeadHunter's logit "
                          "perturbations; image = II_identity)", SCOPES)

    name = "softpag"

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_heads(self.heads)
        _check_range("strength", self.strength, 0.0, 1.0)
        _check_range("scale", self.scale, 0.0, 100.0)
        _check_window(self.start, self.stop)
        if self.target not in ("identity", "uniform"):
            raise ValueError(f"target={self.target!r}: expected 'identity' or 'uniform'")
        if self.scope not in SCOPES:
            raise ValueError(f"scope={self.scope!r}: expected one of {', '.join(SCOPES)}")
        if self.scope != "joint" and self.target != "identity":
            raise ValueError(f"scope={self.scope!r} perturbs one block of the map; target={self.target!r} applies to "
                             "scope='joint' only")


@dataclass(frozen=True)
class PAG(SoftPAG):
    """Perturbed-attention guidance (arXiv 2403.17377): identity attention on the selected heads.

    SoftPAG at strength 1. Unlike diffusers' PAG, layers are matched exactly and heads can be chosen.
    """

    name = "pag"
    fixed = ("strength", "target")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strength != 1.0 or self.target != "identity":
            raise ValueError(f"PAG is SoftPAG with strength=1 and target='identity'; got strength={self.strength}, "
                             f"target={self.target!r}: use SoftPAG for other settings")


@dataclass(frozen=True)
class SEG(_Guidance):
    """Smoothed energy guidance (arXiv 2408.00760): blur the image-token queries of the selected heads.

    The blur is a Gaussian of width ``sigma`` (in tokens) over the spatial token grid (rows and
    columns; per frame for video), with the official code's kernel size and reflect padding; ``sigma=inf``
    or any sigma above 9999 (the official sentinel, e.g. its default 9999999) replaces every query by the
    mean query. Text tokens of joint attention are not blurred. Guidance adds
    ``scale·(ε_c − ε_blurred)``. The paper blurs whole layers: select all heads (``layer:*``) for that.
    ``strength`` u < 1 blends the plain and the blurred query, (1-u)·q + u·blur(q), as HeadHunter's soft
    perturbations do (arXiv 2506.10978); u = 0 perturbs nothing.
    """

    heads: str
    sigma: float = _setting(10.0, "query blur width in tokens, > 0 (inf: the mean query)")
    scale: float = _setting(3.0, _SCALE)
    strength: float = _setting(1.0, "share u in [0, 1] of the blurred query: (1-u) q + u blur(q) (soft SEG; 1 = SEG)")
    start: float = _setting(0.0, _START)
    stop: float = _setting(1.0, _STOP)

    name = "seg"

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_heads(self.heads)
        _number("sigma", self.sigma)
        if not self.sigma > 0:
            raise ValueError(f"sigma={self.sigma!r} is out of range: expected a number > 0 (inf: mean query)")
        _check_range("scale", self.scale, 0.0, 100.0)
        _check_range("strength", self.strength, 0.0, 1.0)
        _check_window(self.start, self.stop)


@dataclass(frozen=True)
class SLG(_Guidance):
    """Skip-layer guidance (as in Stable Diffusion 3.5): the perturbed branch skips whole blocks.

    A skipped block passes its inputs through unchanged (``heads`` names blocks; head indices are
    ignored). Guidance adds ``scale·(ε_c − ε_skip)`` between ``start`` and ``stop``; SD3.5 uses
    blocks 7-9, scale 2.8, start 0.01, stop 0.2.
    """

    layers: str
    scale: float = _setting(2.8, _SCALE)
    start: float = _setting(0.01, _START)
    stop: float = _setting(0.2, _STOP)

    name = "slg"

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_heads(self.layers, field="layers")
        _check_range("scale", self.scale, 0.0, 100.0)
        _check_window(self.start, self.stop)


@dataclass(frozen=True)
class STG(_Guidance):
    """Spatiotemporal skip guidance (arXiv 2411.18664) for video (and image) diffusion.

    ``mode="attention"`` makes the selected layers' self-attention the identity (output = V);
    ``mode="residual"`` skips the selected blocks. ``rescale`` r in [0, 1] rescales the guided
    prediction: ε ← ε·(r·std(ε_c)/std(ε) + 1 − r), with CFG also where the pipeline computes uncond in a
    separate call (Wan; Flux's true CFG).
    """

    layers: str
    mode: str = _setting("attention", "what is skipped: attention (output = V) or residual (the block)",
                         ("attention", "residual"))
    scale: float = _setting(1.0, _SCALE)
    rescale: float = _setting(0.0, "rescale r in [0, 1] of the guided prediction's std toward the conditional's")
    start: float = _setting(0.0, _START)
    stop: float = _setting(1.0, _STOP)

    name = "stg"

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_heads(self.layers, field="layers")
        if self.mode not in ("attention", "residual"):
            raise ValueError(f"mode={self.mode!r}: expected 'attention' or 'residual'")
        _check_range("scale", self.scale, 0.0, 100.0)
        _check_range("rescale", self.rescale, 0.0, 1.0)
        _check_window(self.start, self.stop)


def _check_layer(name: str, layer, lowest: int, meaning: str) -> None:
    if isinstance(layer, bool) or isinstance(layer, str):
        raise ConfigTypeError(f"{name}={layer!r}: expected an int >= {lowest} ({meaning})")
    if not isinstance(layer, numbers.Integral) or layer < lowest:
        raise ValueError(f"{name}={layer!r} is out of range: expected an int >= {lowest} ({meaning})")


def _check_keep(name: str, keep) -> None:
    """``keep`` is a fraction of the image tokens (a float in [0, 1]: 1.0 keeps all) or a count (an int: 1 keeps one)."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise ConfigTypeError(f"{name}={keep!r}: expected a fraction (float in [0, 1]: 1.0 keeps all) or a count "
                              f"(int >= 0: 1 keeps one token), got {type(keep).__name__}")
    if not isinstance(keep, numbers.Integral):
        _check_range(name, keep, 0.0, 1.0)
    elif keep < 0:
        raise ValueError(f"{name}={keep!r} is out of range: expected a count >= 0 (an int counts tokens; a float in "
                         "[0, 1] is a fraction)")


POSITIONS = ("original", "compact")


@dataclass(frozen=True)
class _Pruning(_Method):
    """Common to the pruning configs (keywords): ``positions``, the rotary positions of the tokens kept,
    "original" (default: as before the drop) or "compact" (re-indexed without gaps: per sample, the position
    values the kept tokens use map to consecutive ones, from the first; M-RoPE's axes share the mapping; decode
    steps shift by the gap so left); ``paper_exact=True`` sets every option to the official code's choice
    (``official``) and refuses one given otherwise."""

    applies_to = "vlm"
    official: ClassVar[dict] = {"positions": "compact"}  # the official code's choice of each option

    positions: str | None = field(default=None, kw_only=True, metadata={
        "help": "rotary positions after the drop: original (default) or compact (re-indexed without gaps, as the "
                "official code does)", "choices": POSITIONS})
    paper_exact: bool = field(default=False, kw_only=True, metadata={
        "help": "every option as the official code sets it", "choices": None})

    def __post_init__(self) -> None:
        _plain_numbers(self)
        if not isinstance(self.paper_exact, bool):
            raise ConfigTypeError(f"paper_exact={self.paper_exact!r}: expected True or False")
        if self.positions is not None and self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: expected 'original' or 'compact'")
        if self.paper_exact:
            for name, value in self.official.items():
                if getattr(self, name) not in (None, value):
                    raise ValueError(f"{name}={getattr(self, name)!r} contradicts paper_exact=True: the official "
                                     f"{type(self).__name__} code uses {name}={value!r}")
                object.__setattr__(self, name, value)
        if self.positions is None:
            object.__setattr__(self, "positions", "original")


@dataclass(frozen=True)
class _ScoredAtLayer(_Pruning):
    """Pruning scored by attention in decoder layer ``layer - 1``, keeping ``keep`` image tokens from ``layer`` on."""

    layer: int = 2
    keep: float | int = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_layer("layer", self.layer, 1, "the first pruned layer")
        _check_keep("keep", self.keep)


@dataclass(frozen=True)
class FastV(_ScoredAtLayer):
    """FastV visual token pruning (arXiv 2403.06764) for transformers VLMs.

    At decoder layer ``layer - 1`` the attention of the last query to the image tokens, averaged over
    heads, ranks them; from decoder layer ``layer`` on only the top image tokens and all other tokens
    remain, at their original positions (as the official code keeps them). ``keep`` is a fraction of the image
    tokens (a float, rounded) or a count (an int). Only the prefill is pruned; decode steps attend to the kept
    tokens. The paper's K=2, R=50% is ``FastV(layer=2, keep=0.5)``.
    """

    name = "fastv"
    official: ClassVar[dict] = {"positions": "original"}


@dataclass(frozen=True)
class SparseVLM(_ScoredAtLayer):
    """Text-guided visual token pruning in the manner of SparseVLM (arXiv 2410.04417).

    At decoder layer ``layer - 1`` the text tokens after the first image token are candidate raters. The
    raters are those whose share of attention on image tokens (mean over heads) is at least the mean share
    of the candidates, as SparseVLM picks its vision-relevant text raters. An image token's score is the
    attention the raters give it (mean over heads and raters). The top ``keep`` image tokens remain from
    ``layer`` on, at their original positions (``positions="compact"``: re-indexed, as the official code does).
    Deviations from the paper: one stage at a fixed budget
    (no rank-adaptive budget), no recycling of pruned tokens, and raters are chosen from the layer's own
    attention instead of a separate projection of the raw embeddings.
    """

    name = "sparsevlm"


@dataclass(frozen=True)
class DivPrune(_Pruning):
    """DivPrune (arXiv 2503.02175): keep a diverse subset of the image tokens, chosen before the LLM.

    On the projected visual embeddings (the input of decoder layer ``layer``, 0 by default: the
    multimodal projector's output), cosine distance d = 1 - cos. The first token kept is the one whose
    nearest other image token is farthest; each next one is the token farthest (max-min) from those kept,
    until ``keep`` tokens are chosen. Text tokens always remain; kept tokens keep their original
    positions by default (``positions="compact"`` or ``paper_exact=True``: re-indexed contiguously, as the paper's
    code builds the shorter sequence).
    """

    keep: float | int = 0.5
    layer: int = 0

    name = "divprune"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_keep("keep", self.keep)
        _check_layer("layer", self.layer, 0, "the first pruned layer; 0 prunes before the LLM")


@dataclass(frozen=True)
class VisionZip(_Pruning):
    """Encoder-side visual token pruning in the manner of VisionZip (arXiv 2412.04467) and HiRED (arXiv 2408.10945).

    The vision tower's feature layer ranks the image tokens: the [CLS] query's attention where the tower has a
    [CLS] (CLIP in LLaVA), else the attention each patch receives (SigLIP, Qwen2-VL's tower), mean over heads,
    pooled onto LLM tokens as the projector pools features. ``keep`` image tokens enter the LLM (a fraction of
    the image tokens, or a count): the top ``keep - contextual`` (dominant) and ``contextual`` context tokens,
    spread evenly over the rest, each merged with the pruned tokens most similar to it: ``merge="target_plus_mean"``
    (default, the official formula) gives target + mean(assigned), ``merge="mean"`` the mean of the target and
    the assigned tokens. Deviations: similarity and merging use the projected embeddings (VisionZip: the tower's
    keys and outputs); kept tokens keep their original positions by default (VisionZip re-indexes them: 
    ``positions="compact"`` or ``paper_exact=True``); with HF LLaVA's "default" feature strategy the [CLS] token
    is not among the LLM's tokens, so its dominant slot (the official code keeps [CLS]) goes to one more patch;
    LLaVA-OneVision's AnyRes tiles share one budget per sample (the official code, on LLaVA-NeXT, keeps a budget per
    tile) and its row-newline tokens are never kept (as the official code drops them). Video tokens (LLaVA-OneVision,
    Qwen2-VL, Qwen2.5-VL) are scored in the tower the same way and share the budget with the images.
    """

    keep: float | int = 0.25
    contextual: int = 0
    merge: str = _setting("target_plus_mean", "context tokens: target_plus_mean (official) or mean",
                          ("target_plus_mean", "mean"))

    name = "visionzip"
    official: ClassVar[dict] = {"positions": "compact", "merge": "target_plus_mean"}
    layer = 0  # the first pruned decoder layer: before the LLM

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_keep("keep", self.keep)
        if not isinstance(self.contextual, int) or isinstance(self.contextual, bool) or self.contextual < 0:
            raise ValueError(f"contextual={self.contextual!r} is out of range: expected an int >= 0 (context tokens "
                             "within the kept budget)")
        if self.merge not in ("target_plus_mean", "mean"):
            raise ValueError(f"merge={self.merge!r}: expected 'target_plus_mean' or 'mean'")


@dataclass(frozen=True)
class PyramidDrop(_Pruning):
    """PyramidDrop visual token pruning (arXiv 2410.17247) for transformers VLMs: FastV repeated in stages.

    ``stages`` lists ``(layer, keep)`` pairs. At each stage layer ``L_i`` the image tokens still kept are
    re-ranked and the top ``keep_i`` of them remain from ``L_i`` on. ``keep_i`` is a fraction of the ORIGINAL
    image-token count (a float) or a count (an int). ``ranking="layer_input"`` (default) is the official code's
    rule (``modeling_llama_pdrop.py``): layer ``L_i``'s own ``input_layernorm``, ``q_proj`` and ``k_proj`` (with
    RoPE) applied to its input, the last instruction token's row of probabilities, mean over heads; a fraction
    keeps ``int(N * keep)`` tokens (floor). ``ranking="previous_attention"`` ranks by the last query's attention
    inside layer ``L_i - 1`` instead (the fused FastV scorer; no extra projection), a fraction rounded.
    Deviation from the official code, by default: kept tokens keep their original positions (it re-indexes them
    0..n-1 and shifts decode positions by the tokens dropped: ``positions="compact"`` or ``paper_exact=True``).
    Layers are strictly increasing (each >= 1; the upper bound,
    the model's layer count - 1, is checked when applied); keeps of one kind are non-increasing (a budget
    above the tokens still kept keeps them all). ``FastV(layer=K, keep=r)`` is ``PyramidDrop([(K, r)])``.
    """

    stages: tuple = ((2, 0.5), (4, 0.25))
    ranking: str = _setting("layer_input", "how each stage ranks: layer_input (official) or previous_attention",
                            ("layer_input", "previous_attention"))

    name = "pyramiddrop"
    official: ClassVar[dict] = {"positions": "compact", "ranking": "layer_input"}

    def __post_init__(self) -> None:
        super().__post_init__()
        stages = self.stages
        if isinstance(stages, (str, bytes)) or not isinstance(stages, (list, tuple)) or len(stages) == 0:
            raise ValueError(f"stages={stages!r}: expected a non-empty list of (layer, keep) pairs")
        normalised = []
        for i, stage in enumerate(stages):
            if isinstance(stage, (str, bytes)) or not isinstance(stage, (list, tuple)) or len(stage) != 2:
                raise ValueError(f"stages[{i}]={stage!r}: expected a (layer, keep) pair")
            layer, keep = (int(x) if isinstance(x, numbers.Integral) and not isinstance(x, bool)
                           else float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool) else x for x in stage)
            _check_layer(f"stages[{i}] layer", layer, 1, "the first layer pruned by this stage")
            _check_keep(f"stages[{i}] keep", keep)
            if normalised:
                previous_layer, previous_keep = normalised[-1]
                if layer <= previous_layer:
                    raise ValueError(f"stages[{i}] layer={layer} is out of range: expected layers strictly "
                                     f"increasing, > stages[{i - 1}] layer={previous_layer}")
                if type(keep) is type(previous_keep) and keep > previous_keep:
                    raise ValueError(f"stages[{i}] keep={keep} is out of range: expected keeps non-increasing, "
                                     f"<= stages[{i - 1}] keep={previous_keep}")
            normalised.append((layer, keep))
        object.__setattr__(self, "stages", tuple(normalised))
        if self.ranking not in ("layer_input", "previous_attention"):
            raise ValueError(f"ranking={self.ranking!r}: expected 'layer_input' or 'previous_attention'")

    def to_dict(self) -> dict:
        return {"method": self.name, "stages": [list(stage) for stage in self.stages], "ranking": self.ranking,
                "positions": self.positions, "paper_exact": self.paper_exact}


@dataclass(frozen=True)
class ZeroTuning(_Method):
    """ZeroTuning (arXiv 2505.11739): tune the attention the initial token receives, on chosen heads of a VLM's
    text model.

    On the selected heads the initial token's attention weight is multiplied by ``gamma`` before the row is
    renormalised, i.e. ``log(gamma)`` is added to its logit: gamma > 1 sharpens the rest of the row's
    distribution less (more mass to the sink), gamma < 1 flattens it toward the other tokens. ``heads`` selects
    decoder layers and heads by the names ``layers.<i>`` (e.g. ``"layers.0-3:*"``, ``"layers.2:0,5"``).
    ``gamma=1`` leaves the model exactly as it is. The initial token is each row's first non-padding token (the
    paper's <BOS> where the prompt starts with one); prefill and decode steps both see it. It runs in the fused
    path (``kernels.grouped_attention`` with two key groups weighted [gamma, 1]) and composes with pruning.
    Sliding-window layers are refused (the initial token leaves their window).
    """

    heads: str
    gamma: float = 1.5

    name = "zerotuning"
    applies_to = "vlm"

    def __post_init__(self) -> None:
        _plain_numbers(self)
        parse_heads(self.heads)
        _number("gamma", self.gamma)
        if not 0 < self.gamma <= 100:
            raise ValueError(f"gamma={self.gamma!r} is out of range: expected a number in (0, 100] (1: unchanged)")


@dataclass(frozen=True)
class VAR(_Method):
    """Visual attention redistribution (VAR: "See What You Are Told: Visual Attention Sink in Large Multimodal
    Models", ICLR 2025, arXiv 2503.03321), the official code's rule (seilk/VisAttnSink).

    Sinks: in the prefill, at each decoder layer from ``first_layer`` on, the tokens whose layer input x has
    phi(x) = max over the sink dims of |x_d| / RMS(x) > ``tau`` (every position, image or text, padding excluded);
    decode steps reuse them. ``sink_dims``: the model's massive-activation dims, or "auto": per sample, the dims
    where the first real token's |x_d| / RMS(x) exceeds ``tau`` at ``first_layer``'s input (the official code
    hard-codes Llama-2's [2533, 1415]). Rows: in the prefill the rows after the image, in decode the current row;
    a (head, row) is image-centric when its image mass >= ``image_mass`` and the visual sinks' share of it
    (official: visual-sink mass / (image mass + 1e-6 per image token)) <= ``rho``; layers of a sample without
    visual sinks are left alone. On those rows every sink column (visual and text) keeps the fraction ``p`` of
    its weight and the freed (1 - p) goes to the image's non-sink columns in proportion to their weights; rows
    still sum to 1. ``p=1`` changes nothing. Runs in the fused path (three key groups under one running max,
    reweighted per row) and composes with pruning (the sinks of a pruned layer are found among its kept tokens)
    and with ZeroTuning. Sliding-window layers are left unmodified.
    """

    p: float = _setting(0.6, "fraction of each sink's weight kept, in [0, 1] (1: unchanged)")
    rho: float = _setting(0.5, "largest visual-sink share of the image mass of an image-centric row, in [0, 1]")
    image_mass: float = _setting(0.2, "smallest image mass of an image-centric row, in [0, 1]")
    tau: float = _setting(20.0, "sink threshold on max |x_d| / RMS(x) over the sink dims, > 0")
    sink_dims: tuple[int, ...] | str = _setting("auto", "massive-activation dims, or auto (found per prompt)")
    first_layer: int = _setting(2, "first decoder layer modified (the official code: 2)")

    name = "var"
    applies_to = "vlm"

    def __post_init__(self) -> None:
        _plain_numbers(self)
        for name in ("p", "rho", "image_mass"):
            _check_range(name, getattr(self, name), 0.0, 1.0)
        _number("tau", self.tau)
        if not self.tau > 0:
            raise ValueError(f"tau={self.tau!r} is out of range: expected a number > 0")
        if self.sink_dims != "auto":
            if isinstance(self.sink_dims, str) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                          for d in self.sink_dims) or not len(self.sink_dims):
                raise ValueError(f"sink_dims={self.sink_dims!r}: expected 'auto' or hidden-state dims (ints >= 0)")
            object.__setattr__(self, "sink_dims", tuple(self.sink_dims))
        _check_layer("first_layer", self.first_layer, 0, "the first decoder layer modified")

    def to_dict(self) -> dict:
        data = super().to_dict()
        if self.sink_dims != "auto":
            data["sink_dims"] = list(self.sink_dims)
        return data


@dataclass(frozen=True)
class PAI(_Method):
    """PAI ("Paying More Attention to Image: A Training-Free Method for Alleviating Hallucination in LVLMs",
    ECCV 2024, arXiv 2407.21771), the attention step of the official code (LALBJ/PAI, ``excite_last_visual``).

    On decoder layers ``first_layer`` to ``last_layer`` (inclusive; None: the last), the logits z of the image keys
    in the generating row (each forward's last query: the prompt's last token in the prefill, the new token in each
    decode step) become z + ``alpha`` |z| before the softmax, on every head. ``alpha=0`` changes nothing. The row is
    recomputed exactly from its logits (one row, no N x N matrix); the other rows keep the fused attention. Image
    keys follow pruning. Not included: PAI's optional CFG-style step on the logits (a second, image-free pass).
    """

    alpha: float = _setting(0.5, "image-logit excitation: z + alpha |z|, in [0, 10] (0: unchanged)")
    first_layer: int = _setting(2, "first decoder layer modified (the official scripts: 2)")
    last_layer: int | None = _setting(None, "last decoder layer modified, inclusive (default: the model's last)")

    name = "pai"
    applies_to = "vlm"

    def __post_init__(self) -> None:
        _plain_numbers(self)
        _check_range("alpha", self.alpha, 0.0, 10.0)
        _check_layer("first_layer", self.first_layer, 0, "the first decoder layer modified")
        if self.last_layer is not None:
            _check_layer("last_layer", self.last_layer, self.first_layer, "the last decoder layer modified")


@dataclass(frozen=True)
class ACT(_Method):
    """Attention calibration (ACT: "Unveiling and Harnessing Hidden Attention Sinks: Enhancing Large Language Models
    without Training through Attention Calibration", ICML 2024, arXiv 2406.15765), the official code's rule
    (GATECH-EIC/ACT) on the chosen heads of a VLM's text model.

    In the prefill, per (sample, head), the sinks are the keys whose mean received attention (the sum of their
    column over the queries that see them, divided by the number of those queries) exceeds ``threshold``, except
    the first one found (the official code keeps it: normally <BOS>). Each sink keeps the fraction ``beta`` of its
    weight in every row; the freed mass goes to all the other keys in proportion to their weights (rows still sum
    to 1). ``heads``: ``layers.<i>[:heads]`` (the official code uses a per-model head list found offline, layers 2
    to 30 of Llama-2). Decode steps reuse the prefill's sinks (the official code runs single forward passes; on a
    decode step its rule would see one row). ``beta=1`` changes nothing. Fused path: the sinks' columns are
    recomputed from the saved log-normaliser (no N x N matrix). Sliding-window layers are refused.
    """

    heads: str
    beta: float = _setting(0.4, "fraction of each sink's weight kept, in [0, 1] (1: unchanged)")
    threshold: float = _setting(0.1, "mean received attention above which a key is a sink, in (0, 1]")

    name = "act"
    applies_to = "vlm"

    def __post_init__(self) -> None:
        _plain_numbers(self)
        parse_heads(self.heads)
        _check_range("beta", self.beta, 0.0, 1.0)
        _number("threshold", self.threshold)
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold={self.threshold!r} is out of range: expected a number in (0, 1]")


@dataclass(frozen=True)
class VHR(_Method):
    """Vision-aware head reinforcement (VHR: "Cracking the Code of Hallucination in LVLMs with Vision-aware Head
    Divergence", arXiv 2412.13949), from the paper's rule (its code was not reachable here).

    In the prefill, the heads' outputs (the input of ``o_proj``) at each sample's last token are compared with the
    same model's on the prompt without its image tokens (one extra text-only pass): VHD = ||A(image) - A(no
    image)||, set to 0 for heads whose VHD and squared text-only norm are both above their layer's mean + std.
    In each of ``layers`` the heads with VHD above the layer's median are vision-aware; their outputs are
    multiplied by ``alpha`` at every position of the prefill and of each decode step (heads chosen once, in the
    prefill, and kept). The choice runs layer by layer through the image pass, so earlier reinforcement reaches
    later layers' VHD; the text-only pass runs unmodified (the paper does not say). ``layers``: decoder layer
    indices, default the second and the last 14 (the paper's LLaVA setting; all layers of a smaller model).
    ``alpha=1`` changes nothing.
    """

    alpha: float = _setting(2.0, "output scale of vision-aware heads, in [0, 10] (1: unchanged)")
    layers: tuple[int, ...] | None = _setting(None, "decoder layers (default: 1 and the last 14)")

    name = "vhr"
    applies_to = "vlm"

    def __post_init__(self) -> None:
        _plain_numbers(self)
        _check_range("alpha", self.alpha, 0.0, 10.0)
        if self.layers is not None:
            if isinstance(self.layers, (str, int)) or not len(self.layers) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.layers):
                raise ValueError(f"layers={self.layers!r}: expected decoder layer indices (ints >= 0) or None")
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))

    def to_dict(self) -> dict:
        data = super().to_dict()
        if self.layers is not None:
            data["layers"] = list(self.layers)
        return data
