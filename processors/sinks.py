"""Attention-sink redistribution and head steering for VLM text models, as modifier ops of the shared text
attention (:mod:`mmattn.text_attention`): ZeroTuning (arXiv 2505.11739) and VAR (arXiv 2503.03321)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from mmattn import text_attention
from mmattn._compat import ATTENTION_MASK, cache_argument, cache_length
from mmattn.adapters import vlm_family
from mmattn.api import installing, register_installer
from mmattn.configs import VAR, ZeroTuning
from mmattn.heads import resolve_heads
from mmattn.processors.pruning import stage_positions


class InitialTokenWeight:
    """Modifier op: on ``heads`` (bool (H,)), the first key some row of the call sees (per sample: its first
    non-padding token) has its weight multiplied by ``gamma``."""

    def __init__(self, gamma: float, heads: torch.Tensor):
        self.gamma, self.heads = gamma, heads

    def key_weights(self, module, query, key, attention_mask):
        if self.gamma == 1.0:
            return None
        batch, num_heads, q_len, _ = query.shape
        kv_len = key.shape[2]
        seen = text_attention.dense_visibility(attention_mask, batch, q_len, kv_len, query.device)
        first = seen.any(dim=2)[:, 0].int().argmax(dim=1)  # (B or 1,)
        groups = (torch.arange(kv_len, device=query.device) == first[:, None]).long().expand(batch, kv_len)
        weight = torch.where(self.heads.to(query.device), self.gamma, 1.0).view(1, num_heads, 1)
        return groups, [1.0, weight]


def text_heads(model, spec: str, method: str) -> dict[int, tuple[int, ...]]:
    """{decoder layer index: head indices} of a ``layers.<i>[:heads]`` selection on ``model``'s text model."""
    layers = vlm_family(model, method).text_layers(model)
    heads = model.config.text_config.num_attention_heads
    selection = resolve_heads(spec, {f"layers.{i}": heads for i in range(len(layers))})
    if not selection:
        raise ValueError(f"heads={spec!r} selects no layer")
    return {int(name.split(".")[1]): chosen for name, chosen in selection.items()}


@register_installer(ZeroTuning)
def install_zerotuning(model, config: ZeroTuning):
    selection = text_heads(model, config.heads, "ZeroTuning")
    layers = vlm_family(model, "ZeroTuning").text_layers(model)
    for i in selection:
        window = getattr(layers[i].self_attn, "sliding_window", None)
        if window is not None:
            raise ValueError(f"ZeroTuning: layers.{i} of {type(model).__name__} is a sliding-window layer "
                             f"(window {window}), where the initial token leaves the window; select full-attention layers")
    text_attention.check(model, "ZeroTuning")
    heads_total = model.config.text_config.num_attention_heads
    with installing() as changes:
        changes.add(text_attention.use(model, "ZeroTuning"))
        for i, chosen in selection.items():
            mask = torch.zeros(heads_total, dtype=torch.bool)
            mask[list(chosen)] = True
            changes.add(text_attention.add_op(layers[i].self_attn, InitialTokenWeight(config.gamma, mask)))
    return changes.undo


@dataclass
class LayerSinkStats:
    """What VAR did in one decoder layer during the last forward: visual and text sinks found (summed over the
    batch), image-centric (head, row) pairs redistributed and the attention mass they moved (summed)."""

    layer: int
    visual_sinks: int = 0
    text_sinks: int = 0
    rows: int = 0
    mass_moved: float = 0.0


@dataclass
class SinkStats:
    """Per-layer VAR statistics of the last forward (``last_sink_stats(model)``)."""

    layers: list[LayerSinkStats] = field(default_factory=list)


_SINK_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> SinkStats of its last forward


def last_sink_stats(model) -> SinkStats | None:
    return _SINK_STATS.get(model)


class _VARState:
    """One VAR installation: the prefill's image and padding masks, and per layer the sink scores phi of every
    original position (decode steps reuse them)."""

    def __init__(self, model, config: VAR, image_ids: list[int]):
        self.model, self.config = weakref.ref(model), config
        self.image_ids = torch.tensor(image_ids)
        self.image_mask = self.padding = None  # (B, N) of the prefill
        self.prefill = False
        self.dims: torch.Tensor | None = None  # (B, n_dims) sink dims per sample
        self.phi: dict[int, torch.Tensor] = {}  # layer -> (B, N) phi of each original position (-1: not seen)

    def begin(self, module, args, kwargs):
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        cache = cache_argument(kwargs)
        self.prefill = cache is None or cache_length(cache) == 0
        if self.prefill:
            if input_ids is None:
                raise ValueError("VAR finds image tokens in input_ids; this forward got inputs_embeds only")
            self.image_mask = torch.isin(input_ids, self.image_ids.to(input_ids.device))
            mask = kwargs.get(ATTENTION_MASK)
            self.padding = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            self.phi, self.dims = {}, None
        _SINK_STATS[self.model()] = SinkStats()

    def layer_hook(self, index: int):
        def hook(module, args, kwargs):
            if not self.prefill:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            batch, n = self.image_mask.shape
            positions = next((p for p in stage_positions(self.model(), index) if (n if p is None else p.shape[1])
                              == hidden.shape[1]), None)
            positions = torch.arange(n, device=hidden.device).expand(batch, n) if positions is None else positions
            x = hidden.float()
            r = (x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)).abs()
            if self.dims is None:
                self.dims = self._find_dims(r, positions)
            r = torch.cat([r, torch.zeros_like(r[..., :1])], -1)  # dim d: the zero column of samples without sinks
            phi = r.gather(2, self.dims.to(r.device)[:, None, :].expand(-1, r.shape[1], -1)).amax(-1)
            full = torch.full((batch, n), -1.0, device=hidden.device)
            self.phi[index] = full.scatter(1, positions.to(hidden.device), phi)
            return None

        return hook

    def _find_dims(self, r: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(B, n_dims) sink dims: the configured ones, or per sample the dims where its first real token's
        |x_d| / RMS(x) exceeds tau (-1 padding never matches: those samples have no sinks)."""
        if self.config.sink_dims != "auto":
            dims = torch.tensor(self.config.sink_dims, device=r.device)
            if int(dims.max()) >= r.shape[-1]:
                raise ValueError(f"sink_dims={self.config.sink_dims}: the hidden size is {r.shape[-1]}")
            return dims.expand(r.shape[0], -1)
        real = torch.ones_like(positions, dtype=torch.bool) if self.padding is None else \
            self.padding.to(positions.device).gather(1, positions)
        first = r[torch.arange(r.shape[0]), real.int().argmax(1)]  # (B, d)
        massive = first > self.config.tau
        count = max(1, int(massive.sum(1).max()))
        dims = torch.where(massive, torch.arange(r.shape[-1], device=r.device), r.shape[-1])
        return dims.sort(1).values[:, :count]  # samples without massive dims point at the zero column

    def sinks(self, index: int, kv_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, kv_len) sink keys and image keys of layer ``index``: its prefill tokens
        (kept ones, under pruning) then the tokens decoded since (never sinks, never image)."""
        batch, n = self.image_mask.shape
        positions = next((p for p in stage_positions(self.model(), index)[:1] if p is not None), None)
        positions = torch.arange(n, device=device).expand(batch, n) if positions is None else positions.to(device)
        phi = self.phi[index].to(device).gather(1, positions)
        image = self.image_mask.to(device).gather(1, positions)
        real = torch.ones_like(image) if self.padding is None else self.padding.to(device).gather(1, positions)
        sink = (phi > self.config.tau) & real
        extra = kv_len - positions.shape[1]
        pad = torch.zeros(batch, max(0, extra), dtype=torch.bool, device=device)
        return torch.cat([sink, pad], 1)[:, -kv_len:], torch.cat([image, pad], 1)[:, -kv_len:]


class VisualSinkRedistribution:
    """Modifier op of one decoder layer (VAR): sinks keep ``p`` of their weight on image-centric (head, row)s, the
    freed mass goes to the image's non-sink keys in proportion. Groups: 0 sinks, 1 image non-sinks, 2 the rest."""

    def __init__(self, state: _VARState, index: int):
        self.state, self.index = state, index

    def key_weights(self, module, query, key, attention_mask):
        state, config = self.state, self.state.config
        if config.p == 1.0 or self.index not in state.phi:
            return None
        batch, heads, q_len, _ = query.shape
        kv_len = key.shape[2]
        sink, image = state.sinks(self.index, kv_len, query.device)
        visual_sinks = sink & image
        has_visual_sinks = visual_sinks.any(1)  # (B,)
        if not bool(has_visual_sinks.any()):
            self._record(sink, image, None, None)
            return None
        groups = torch.where(sink, 0, torch.where(image, 1, 2))
        if state.prefill:  # the rows after each sample's image (query positions are the layer's last q_len keys)
            last_image = torch.where(image, torch.arange(kv_len, device=query.device), -1).amax(1)
            rows = torch.arange(kv_len - q_len, kv_len, device=query.device)[None, :] > last_image[:, None]
        else:
            rows = torch.ones(batch, q_len, dtype=torch.bool, device=query.device)
        rows &= has_visual_sinks[:, None]
        n_image = image.sum(1).float()
        seen = text_attention.dense_visibility(attention_mask, batch, q_len, kv_len, query.device)
        scale = module.scaling if hasattr(module, "scaling") else query.shape[-1] ** -0.5
        count = int(visual_sinks.sum(1).max())
        columns = torch.where(visual_sinks, torch.arange(kv_len, device=query.device), kv_len).sort(1).values[:, :count]
        valid = columns < kv_len
        columns = columns.clamp_max(kv_len - 1)

        def weights(probs, lse):
            sink_mass, image_rest, _ = probs
            k = key.gather(2, columns[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1]))
            q5 = query.float().view(batch, key.shape[1], heads // key.shape[1], q_len, -1)
            s = (q5 @ k.float()[:, :, None].transpose(-1, -2)).view(batch, heads, q_len, count) * scale
            visible = seen.expand(batch, 1, q_len, kv_len).gather(3, columns[:, None, None, :].expand(-1, 1, q_len, -1))
            p = torch.where(visible & valid[:, None, None, :], (s - lse[..., None]).exp(), 0.0)
            visual_sink_mass = p.sum(-1)
            image_mass = visual_sink_mass + image_rest
            portion = visual_sink_mass / (image_mass + 1e-6 * n_image[:, None, None])
            chosen = (portion <= config.rho) & (image_mass >= config.image_mass) & rows[:, None, :] & (image_rest > 0)
            moved = (1 - config.p) * sink_mass
            self._record(sink, image, chosen, moved)
            w_sink = torch.where(chosen, config.p, 1.0)
            w_image = torch.where(chosen, 1 + moved / torch.where(image_rest > 0, image_rest, 1.0), 1.0)
            return [w_sink, w_image, torch.ones_like(w_sink)]

        return groups, text_attention.RowWeights(3, weights)

    def _record(self, sink, image, chosen, moved) -> None:
        stats = _SINK_STATS.get(self.state.model())
        if stats is None:
            return
        layer = next((s for s in stats.layers if s.layer == self.index), None)
        if layer is None:
            layer = LayerSinkStats(self.index)
            stats.layers.append(layer)
        layer.visual_sinks += int((sink & image).sum())
        layer.text_sinks += int((sink & ~image).sum())
        if chosen is not None:
            layer.rows += int(chosen.sum())
            layer.mass_moved += float(torch.where(chosen, moved, 0.0).sum())


@register_installer(VAR)
def install_var(model, config: VAR):
    family = vlm_family(model, "VAR")
    layers = family.text_layers(model)
    if not config.first_layer < len(layers):
        raise ValueError(f"first_layer={config.first_layer} is out of range for {type(model).__name__}: its language "
                         f"model has {len(layers)} layers; expected 0 <= first_layer <= {len(layers) - 1}")
    text_attention.check(model, "VAR")
    image_ids = [model.config.image_token_id]
    if family.video:
        image_ids.append(model.config.video_token_id)
    state = _VARState(model, config, image_ids)
    with installing() as changes:
        changes.add(text_attention.use(model, "VAR"))
        changes.add(model.model.register_forward_pre_hook(state.begin, with_kwargs=True).remove)
        changes.add(lambda: _SINK_STATS.pop(model, None))
        for i in range(config.first_layer, len(layers)):
            if getattr(layers[i].self_attn, "sliding_window", None) is not None:
                continue
            changes.add(layers[i].register_forward_pre_hook(state.layer_hook(i), with_kwargs=True).remove)
            changes.add(text_attention.add_op(layers[i].self_attn, VisualSinkRedistribution(state, i)))
    return changes.undo
