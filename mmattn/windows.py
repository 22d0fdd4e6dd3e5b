"""Window specs and window attention on token grids, with NATTEN's semantics (arXiv 2204.07143, 2209.15001).

A spec says, per grid axis, which keys a query sees:

* ``kernel_size`` K: the window's extent in (dilated) tokens. Odd K: K // 2 on each side; even K (as NATTEN
  allows): K // 2 before the query and K // 2 - 1 after. Near a border the window shifts inward, so every query
  sees exactly K keys per axis (non-causal).
* ``dilation`` d: the axis splits into d interleaved groups (coordinate mod d); a query sees keys of its own
  group only, with the window taken over the group's coordinates (coordinate // d).
* ``stride`` s (1 <= s <= K): queries form groups of s consecutive (group) coordinates that share one window,
  the window of the group's leader: its centre query (the right-hand one of the two centres when s is even),
  or with ``causal`` its last query. ``stride = kernel_size`` is blocked (non-overlapping tiles) attention.
* ``causal``: a query sees keys at or before it, within K - 1 of its stride group's leader; no inward shift.

Grids are row-major (the last axis fastest), as a flattened ``(B, *grid, H, D)`` tensor is. ``kernel_size *
dilation`` may not exceed the axis extent. Attention runs on ``mmattn.kernels.attention`` with a block mask:
tokens are permuted into tiles (one 64-token block each), windows become dense blocks, borders partial ones.
Block masks are built once per (grid, spec, extra tokens, device) and cached.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import torch

from .configs import ConfigTypeError, _check_window, _Method, _setting
from .heads import parse_heads

BLOCK = 64  # tokens per tile: one query block and one key block of the block mask


def _per_axis(name: str, value, ndim: int, kind=int) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{name}={value!r}: expected one value or {ndim} (one per axis)")
    for v in values:
        if kind is bool:
            if not isinstance(v, bool):
                raise ConfigTypeError(f"{name}={value!r}: expected bools")
        elif isinstance(v, bool) or not isinstance(v, int):
            raise ConfigTypeError(f"{name}={value!r}: expected integers")
    return values


@dataclass(frozen=True)
class Window:
    """A neighborhood window over an ``ndim``-axis token grid (see the module docstring for every argument)."""

    kernel_size: int | tuple[int, ...]
    dilation: int | tuple[int, ...] = 1
    stride: int | tuple[int, ...] = 1
    causal: bool | tuple[bool, ...] = False

    ndim = 0

    def __post_init__(self) -> None:
        for name in ("kernel_size", "dilation", "stride"):
            object.__setattr__(self, name, _per_axis(name, getattr(self, name), self.ndim))
        object.__setattr__(self, "causal", _per_axis("causal", self.causal, self.ndim, bool))
        for axis, (k, d, s) in enumerate(zip(self.kernel_size, self.dilation, self.stride)):
            if k < 1 or d < 1:
                raise ValueError(f"axis {axis}: kernel_size={k}, dilation={d}: expected integers >= 1")
            if not 1 <= s <= k:
                raise ValueError(f"axis {axis}: stride={s} is out of range: expected 1 <= stride <= kernel_size={k}")

    def check_grid(self, grid: tuple[int, ...]) -> None:
        """Refuse a grid this window does not fit: wrong number of axes, or kernel_size * dilation > extent."""
        if len(grid) != self.ndim:
            raise ValueError(f"{type(self).__name__} needs a {self.ndim}-axis token grid; got grid {tuple(grid)}")
        for axis, (n, k, d) in enumerate(zip(grid, self.kernel_size, self.dilation)):
            if k * d > n:
                raise ValueError(f"axis {axis}: kernel_size {k} x dilation {d} = {k * d} exceeds the grid's "
                                 f"extent {n} (grid {tuple(grid)})")

    def visible(self, q: tuple[torch.Tensor, ...], k: tuple[torch.Tensor, ...], grid: tuple[int, ...]) -> torch.Tensor:
        """Whether queries at coordinates ``q`` see keys at ``k`` (per-axis integer tensors that broadcast)."""
        out = None
        for axis in range(self.ndim):
            seen = _axis_visible(q[axis], k[axis], grid[axis], self.kernel_size[axis], self.dilation[axis],
                                 self.stride[axis], self.causal[axis])
            out = seen if out is None else out & seen
        return out


class Window1D(Window):
    ndim = 1


class Window2D(Window):
    ndim = 2


class Window3D(Window):
    ndim = 3


@dataclass(frozen=True)
class SlidingTiles:
    """Sliding tile attention (STA, arXiv 2502.04507): the grid is cut into tiles of ``tile`` tokens per axis; a
    query sees every token of the ``window`` x ... tiles (counted in tiles, odd or even) around its own tile,
    shifted inward at the borders (NATTEN's rule on the tile grid). With tiles of 64 tokens (the block size: e.g.
    8 x 8, or 4 x 4 x 4) every visited block is full."""

    tile: tuple[int, ...]
    window: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("tile", "window"):
            values = tuple(getattr(self, name))
            if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
                raise ValueError(f"{name}={getattr(self, name)!r}: expected positive integers, one per axis")
            object.__setattr__(self, name, values)
        if len(self.tile) != len(self.window):
            raise ValueError(f"tile={self.tile} and window={self.window} need one value per axis each")

    @property
    def ndim(self) -> int:
        return len(self.tile)

    def tiles(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(-(-n // t) for n, t in zip(grid, self.tile))

    def check_grid(self, grid: tuple[int, ...]) -> None:
        if len(grid) != self.ndim:
            raise ValueError(f"SlidingTiles needs a {self.ndim}-axis token grid; got grid {tuple(grid)}")
        for axis, (count, w) in enumerate(zip(self.tiles(grid), self.window)):
            if w > count:
                raise ValueError(f"axis {axis}: a window of {w} tiles exceeds the grid's {count} tiles "
                                 f"(grid {tuple(grid)}, tile {self.tile})")

    def visible(self, q, k, grid):
        out = None
        for axis, (t, w, count) in enumerate(zip(self.tile, self.window, self.tiles(grid))):
            seen = _axis_visible(q[axis] // t, k[axis] // t, count, w, 1, 1, False)
            out = seen if out is None else out & seen
        return out


@dataclass(frozen=True)
class Radial:
    """Radial attention for video (arXiv 2506.19852) on a (frames, rows, cols) grid: frames at most
    ``dense_frames`` apart attend densely; farther pairs keep a band around the spatial diagonal, |s_q - s_k| <
    width / 2 with s a token's row-major index within its frame, whose width starts at the frame's token count and
    halves with each doubling of the frame distance (width = S / 2^floor(log2(|dt| / dense_frames))); every query
    sees frame 0 whole (``sink_frame``). The official kernels round the band to blocks; this mask is exact."""

    dense_frames: int = 1
    sink_frame: bool = True

    ndim = 3

    def __post_init__(self) -> None:
        if isinstance(self.dense_frames, bool) or not isinstance(self.dense_frames, int) or self.dense_frames < 0:
            raise ValueError(f"dense_frames={self.dense_frames!r}: expected an integer >= 0")
        if not isinstance(self.sink_frame, bool):
            raise ConfigTypeError(f"sink_frame={self.sink_frame!r}: expected a bool")

    def check_grid(self, grid: tuple[int, ...]) -> None:
        if len(grid) != 3:
            raise ValueError(f"Radial needs a (frames, rows, cols) token grid; got grid {tuple(grid)}")

    def visible(self, q, k, grid):
        frames, rows, cols = grid
        dt = (q[0] - k[0]).abs()
        s_q, s_k = q[1] * cols + q[2], k[1] * cols + k[2]
        level = torch.floor(torch.log2((dt.float() / max(1, self.dense_frames)).clamp_min(1)))
        width = rows * cols / torch.pow(2.0, level)
        out = (dt <= self.dense_frames) | ((s_q - s_k).abs().float() < width / 2)
        return out | (k[0] == 0) if self.sink_frame else out


def _axis_visible(q, k, extent: int, kernel: int, dilation: int, stride: int, causal: bool) -> torch.Tensor:
    """One axis of the neighborhood rule (module docstring), on broadcasting coordinate tensors."""
    group_q, group_k = q % dilation, k % dilation
    iq, ik = q // dilation, k // dilation
    group_extent = extent // dilation + (group_q < extent % dilation).to(q.dtype)
    if causal:
        leader = torch.minimum(iq // stride * stride + stride - 1, group_extent - 1)
        seen = (ik <= iq) & (leader - ik < kernel)
    else:
        before = kernel // 2
        after = kernel - 1 - before
        leader = torch.minimum(iq // stride * stride + stride // 2, group_extent - 1)
        centre = torch.maximum(torch.minimum(leader, group_extent - 1 - after), torch.full_like(leader, before))
        seen = (ik >= centre - before) & (ik <= centre + after)
    return seen & (group_q == group_k)


def tile_shape(grid: tuple[int, ...], volume: int = BLOCK) -> tuple[int, ...]:
    """Power-of-two tile extents whose product is ``volume`` (or the whole grid, if smaller), split so that the
    axes with the most tiles get the larger extents."""
    tile = [1] * len(grid)
    while math.prod(tile) < volume:
        open_axes = [a for a in range(len(grid)) if tile[a] < grid[a]]
        if not open_axes:
            break
        axis = max(open_axes, key=lambda a: (grid[a] / tile[a], -a))
        tile[axis] *= 2
    return tuple(tile)


def tile_order(grid: tuple[int, ...], tile: tuple[int, ...] | None = None) -> torch.Tensor:
    """(N,) row-major token indices in tile-major order: tile after tile (row-major over tiles), each tile's tokens
    row-major. Border tiles are smaller; no padding."""
    tile = tile or tile_shape(grid)
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(-1, len(grid))
    tiles_shape = [-(-n // t) for n, t in zip(grid, tile)]
    key = torch.zeros(coords.shape[0], dtype=torch.long)
    for axis, (count, t) in enumerate(zip(tiles_shape, tile)):
        key = key * count + coords[:, axis] // t
    for axis, t in enumerate(tile):
        key = key * t + coords[:, axis] % t
    return torch.argsort(key)


@dataclass(frozen=True)
class WindowPlan:
    """How to run one windowed attention: ``order`` permutes the sequence (image tokens tile-major first, then the
    other tokens in their order), ``inverse`` undoes it, ``mask`` is the block mask in the permuted order."""

    order: torch.Tensor
    inverse: torch.Tensor
    mask: object  # kernels.BlockMask


def plan(spec, grid: tuple[int, ...], before: int = 0, after: int = 0, extra_keys: int = 0,
         text: str = "global", device="cpu") -> WindowPlan:
    """The plan for a sequence [``before`` other tokens, the grid's image tokens (row-major), ``after`` other
    tokens] attending to itself plus ``extra_keys`` keys appended after it (seen by every query).

    Image queries see their window and, with ``text="global"``, every other token; other tokens' queries see
    everything. ``text="separate"``: image queries see their window only, other queries the other tokens only."""
    spec.check_grid(tuple(grid))
    if text not in ("global", "separate"):
        raise ValueError(f"text={text!r}: expected 'global' or 'separate'")
    return _plan(spec, tuple(grid), before, after, extra_keys, text, str(torch.device(device)))


@lru_cache(maxsize=64)
def _plan(spec, grid, before, after, extra_keys, text, device) -> WindowPlan:
    from mmattn.kernels import BlockMask

    n = math.prod(grid)
    total = before + n + after
    image_order = tile_order(grid, getattr(spec, "tile", None) if math.prod(getattr(spec, "tile", (0,))) == BLOCK
                             else None)
    order = torch.cat([before + image_order, torch.arange(before), torch.arange(before + n, total)])
    inverse = torch.argsort(order)
    coords = torch.stack(torch.meshgrid(*(torch.arange(e) for e in grid), indexing="ij"), -1).reshape(n, -1)
    table = torch.cat([coords[image_order], torch.zeros(total - n + extra_keys, len(grid), dtype=torch.long)])
    table = table.to(device=device, dtype=torch.int32)

    def mask_mod(b, h, q, k):
        window = spec.visible(tuple(table[q.long(), a] for a in range(len(grid))),
                              tuple(table[k.long(), a] for a in range(len(grid))), grid)
        q_image, k_image, k_extra = q < n, k < n, k >= total
        if text == "global":
            return torch.where(q_image & k_image, window, True)
        return torch.where(k_extra, True, torch.where(q_image, k_image & window, ~k_image))

    mask = BlockMask.from_mask_mod(mask_mod, None, None, total, total + extra_keys, BLOCK, BLOCK, device)
    return WindowPlan(order.to(device), inverse.to(device), mask)


def windowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_plan: WindowPlan, scale: float | None = None,
             backend: str | None = None) -> torch.Tensor:
    """Attention of (B, H, N, D) tensors in sequence order under ``window_plan``; keys may carry the plan's extra
    keys after the N sequence tokens. Returns (B, H, N, D) in sequence order."""
    from mmattn.kernels import attention

    n = q.shape[2]
    order, inverse = window_plan.order, window_plan.inverse
    key_order = torch.cat([order, torch.arange(n, k.shape[2], device=order.device)])
    out = attention(q.index_select(2, order), k.index_select(2, key_order), v.index_select(2, key_order),
                    scale=scale, block_mask=window_plan.mask, backend=backend)
    return out.index_select(2, inverse)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: Window,
                     additional_keys: torch.Tensor | None = None, additional_values: torch.Tensor | None = None,
                     scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Neighborhood attention on grid-shaped tensors, as ``natten.na1d/na2d/na3d`` take them.

    ``q``, ``k``, ``v``: (B, *grid, H, D) with ``len(grid) == spec.ndim``. ``additional_keys`` /
    ``additional_values`` (B, A, H, D): keys every query sees besides its window (e.g. text tokens), merged
    exactly (one softmax over window and additional keys). ``scale`` defaults to D ** -0.5. Returns (B, *grid, H, D).
    """
    if q.shape != k.shape or k.shape[:-1] != v.shape[:-1] or q.dim() != spec.ndim + 3:
        raise ValueError(f"{type(spec).__name__} needs q, k, v of shape (B, *grid ({spec.ndim} axes), H, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values go together")
    grid = tuple(q.shape[1:-2])
    b, heads = q.shape[0], q.shape[-2]

    def flat(x):
        return x.reshape(b, -1, heads, x.shape[-1]).transpose(1, 2)

    keys, values = flat(k), flat(v)
    extra = 0
    if additional_keys is not None:
        if additional_keys.shape[0] != b or additional_keys.shape[2:] != k.shape[-2:] or \
                additional_values.shape[:3] != additional_keys.shape[:3]:
            raise ValueError(f"additional keys/values must be (B, A, H, D) = ({b}, A, {heads}, {k.shape[-1]}); got "
                             f"{tuple(additional_keys.shape)}, {tuple(additional_values.shape)}")
        extra = additional_keys.shape[1]
        keys = torch.cat([keys, additional_keys.transpose(1, 2)], 2)
        values = torch.cat([values, additional_values.transpose(1, 2)], 2)
    window_plan = plan(spec, grid, extra_keys=extra, device=q.device)
    out = windowed(flat(q), keys, values, window_plan, scale, backend)
    return out.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])


def _check_window_settings(config) -> None:
    """The settings WindowAttention and FreeSwim share: layers, steps, text, entropy scaling."""
    if config.layers != "*":
        parse_heads(config.layers, field="layers")
    if not isinstance(config.steps, (tuple, list)) or len(config.steps) != 2:
        raise ValueError(f"steps={config.steps!r}: expected (start, stop)")
    object.__setattr__(config, "steps", tuple(float(s) for s in config.steps))
    _check_window(*config.steps)
    if config.text not in ("global", "separate"):
        raise ValueError(f"text={config.text!r}: expected 'global' or 'separate'")
    if not isinstance(config.entropy_scaling, bool):
        raise ConfigTypeError(f"entropy_scaling={config.entropy_scaling!r}: expected a bool")
    tokens = config.training_tokens
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2):
        raise ValueError(f"training_tokens={tokens!r}: expected an integer >= 2 or None")


WINDOWS = {cls.__name__: cls for cls in (Window1D, Window2D, Window3D, SlidingTiles, Radial)}


@dataclass(frozen=True)
class WindowAttention(_Method):
    """Window attention on the image (or video) tokens of a diffusion model's self-attention layers.

    ``window``: a :class:`Window2D` for image models, :class:`Window3D` (frames, rows, cols) for video models,
    NATTEN's semantics (module docstring), over each layer's own token grid as the call lays it out (a UNet's
    deeper blocks see a coarser grid); or :class:`SlidingTiles` (2 or 3 axes) or :class:`Radial` (video). ``layers``: attention layers by exact block name (``"*"``: all).
    ``steps``: the fractions [start, stop) of the denoising steps that use windows; dense attention elsewhere
    (Radial keeps the first steps dense). ``text``: joint attention's text tokens (SD3 [image, text], Flux
    [text, image]) see everything and are seen by every query ("global"), or attend among themselves only, with
    image queries seeing their window only ("separate"). ``entropy_scaling`` (Jin et al. 2023, arXiv 2306.08645):
    logits scaled by sqrt(log N / log T), N the image tokens of the call, T ``training_tokens`` (default: those of
    the pipeline's default resolution). A window covering the whole grid equals dense attention.
    """

    window: Window | SlidingTiles | Radial
    layers: str = _setting("*", "attention layers by block name, e.g. transformer_blocks.0-3 ('*': all)")
    steps: tuple[float, float] = _setting((0.0, 1.0), "fractions [start, stop) of the denoising steps windowed")
    text: str = _setting("global", "text tokens: global (see and seen by all) or separate", ("global", "separate"))
    entropy_scaling: bool = _setting(False, "scale logits by sqrt(log N / log T) for N tokens, T training tokens")
    training_tokens: int | None = _setting(None, "T of entropy scaling (default: the pipeline's default resolution)")

    name = "window"

    def __post_init__(self) -> None:
        window = self.window
        if isinstance(window, dict):  # from to_dict()
            settings = dict(window)
            kind = settings.pop("type", None)
            if kind not in WINDOWS:
                raise ValueError(f"window type={kind!r}: expected one of {', '.join(WINDOWS)}")
            window = WINDOWS[kind](**settings)
        if not isinstance(window, tuple(WINDOWS.values())):
            raise ConfigTypeError(f"window={window!r}: expected one of {', '.join(WINDOWS)}")
        object.__setattr__(self, "window", window)
        _check_window_settings(self)

    def to_dict(self) -> dict:
        window = {"type": type(self.window).__name__,
                  **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.window).items()}}
        return {"method": self.name, "window": window, "layers": self.layers, "steps": list(self.steps),
                "text": self.text, "entropy_scaling": self.entropy_scaling, "training_tokens": self.training_tokens}


@dataclass(frozen=True)
class FreeSwim(_Method):
    """FreeSwim (arXiv 2511.14712; official code github WillWu111/FreeSwim, read for these rules): window attention
    sized to the model's training-scale token grid, for generating above the training resolution.

    As the official code: each selected self-attention layer sees, per spatial axis, a window of 2 * (t // 2) + 1
    tokens centred on the query for a training extent t (NATTEN's inward window at borders), all frames of a video
    (no temporal limit); ``training_grid`` (frames, rows, cols) defaults to the pipeline's default resolution, and
    an axis at or below the window is covered whole. ``entropy_scaling`` (on by default) multiplies the logits of
    every self-attention, window and full branch, by ``entropy_rule``'s factor: "official", sqrt(log 2T / log T)
    with T one training frame's tokens (the official code's constant, whatever the resolution), or "tokens",
    sqrt(log N / log T) with N the call's image tokens and T all the training grid's (Jin et al., arXiv 2306.08645;
    1 at the training size). ``dual_path``: a full-attention branch runs every ``refresh_every`` steps and its
    cross-attention outputs replace the window branch's in every selected block until the next refresh; "auto"
    (the official method) turns it on where the blocks have cross-attention (Wan, PixArt). ``uncond``: "window",
    the official cached variant (the CFG uncond pass is windowed only, never overridden), or "full" (its no-cache
    variant: the uncond pass gets the full branch's cross-attention too). ``layers``, ``steps``, ``text`` as in
    :class:`WindowAttention`. Not here: the official script's coarse-to-fine stage (generate at the base size,
    upsample, video-to-video at strength 0.7), which is pipeline work, not attention; the official cache holds
    cross-attention before ``to_out`` (before Wan I2V's image term), ours its module output (the same for T2V).
    """

    layers: str = _setting("*", "attention layers by block name ('*': all)")
    steps: tuple[float, float] = _setting((0.0, 1.0), "fractions [start, stop) of the denoising steps windowed")
    text: str = _setting("global", "text tokens: global or separate", ("global", "separate"))
    entropy_scaling: bool = _setting(True, "scale self-attention logits (entropy_rule)")
    entropy_rule: str = _setting("official", "official: sqrt(log 2T / log T); tokens: sqrt(log N / log T)",
                                 ("official", "tokens"))
    training_tokens: int | None = _setting(None, "T of entropy scaling (default: from the training grid)")
    training_grid: tuple[int, int, int] | None = _setting(None, "(frames, rows, cols) of the training-scale tokens")
    dual_path: str = _setting("auto", "full-attention branch for cross-attention outputs: auto (where blocks have "
                              "cross-attention), on or off", ("auto", "on", "off"))
    refresh_every: int = _setting(2, "steps between recomputations of the full-attention branch, >= 1")
    uncond: str = _setting("window", "CFG uncond pass: window only (official cache) or full-branch cross-attention",
                           ("window", "full"))

    name = "freeswim"

    def __post_init__(self) -> None:
        _check_window_settings(self)
        if self.training_grid is not None:
            grid = tuple(self.training_grid)
            if len(grid) != 3 or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
                raise ValueError(f"training_grid={self.training_grid!r}: expected (frames, rows, cols), positive ints")
            object.__setattr__(self, "training_grid", grid)
        for f in fields(self):  # the string settings against the choices their field declares
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r}: expected one of {', '.join(map(repr, choices))}")
        if isinstance(self.refresh_every, bool) or not isinstance(self.refresh_every, int) or self.refresh_every < 1:
            raise ValueError(f"refresh_every={self.refresh_every!r}: expected an integer >= 1")

    def window_of(self, trained: tuple[int, ...], grid: tuple[int, ...], video: bool) -> Window2D | Window3D:
        """The window of a call's ``grid`` for the training extents ``trained`` (same axes): 2 * (t // 2) + 1 per
        spatial axis, every frame."""
        kernel = tuple(g if video and axis == 0 else min(2 * (t // 2) + 1, g)
                       for axis, (t, g) in enumerate(zip(trained, grid)))
        return (Window3D if video else Window2D)(kernel)

    def to_dict(self) -> dict:
        data = super().to_dict()
        data["steps"] = list(self.steps)
        if self.training_grid is not None:
            data["training_grid"] = list(self.training_grid)
        return data
