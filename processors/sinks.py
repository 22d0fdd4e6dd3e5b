"""Attention-sink redistribution and head steering for VLM text models, as modifier ops of the shared text
attention (:mod:`mmattn.text_attention`): ZeroTuning (arXiv 2505.11739), VAR (arXiv 2503.03321), PAI
(arXiv 2407.21771), ACT (arXiv 2406.15765) and VHR (arXiv 2412.13949)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from mmattn import text_attention
from mmattn._compat import ATTENTION_MASK, cache_argument, cache_length
from mmattn.adapters import vlm_family
from mmattn.api import installing, register_installer
from mmattn import kernels
from mmattn.configs import ACT, PAI, VAR, VHR, ZeroTuning
from mmattn.kernels import BlockMask
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


def install_head_ops(model, spec: str, method: str, make_op, why: str = ""):
    """Validate a ``layers.<i>[:heads]`` selection (full-attention layers only; ``why`` says why), then add
    ``make_op(heads)`` (heads: bool (H,)) to each selected layer's attention. Returns undo."""
    selection = text_heads(model, spec, method)
    layers = vlm_family(model, method).text_layers(model)
    for i in selection:
        window = getattr(layers[i].self_attn, "sliding_window", None)
        if window is not None:
            raise ValueError(f"{method}: layers.{i} of {type(model).__name__} is a sliding-window layer "
                             f"(window {window}){why}; select full-attention layers")
    text_attention.check(model, method)
    heads_total = model.config.text_config.num_attention_heads
    with installing() as changes:
        changes.add(text_attention.use(model, method))
        for i, chosen in selection.items():
            mask = torch.zeros(heads_total, dtype=torch.bool)
            mask[list(chosen)] = True
            changes.add(text_attention.add_op(layers[i].self_attn, make_op(mask)))
    return changes.undo


@register_installer(ZeroTuning)
def install_zerotuning(model, config: ZeroTuning):
    return install_head_ops(model, config.heads, "ZeroTuning", lambda heads: InitialTokenWeight(config.gamma, heads),
                            ", where the initial token leaves the window")


@dataclass
class LayerSinkStats:
    """What VAR did in one decoder layer during the last forward: visual and text sinks found (summed over the
    batch), image-centric (head, row) pairs redistributed and the attention mass they moved (summed);
    ``visual_sink_keys`` (B, keys) bool: which of the layer's keys were visual sinks."""

    layer: int
    visual_sinks: int = 0
    text_sinks: int = 0
    rows: int = 0
    mass_moved: float = 0.0
    visual_sink_keys: torch.Tensor | None = field(default=None, repr=False)


@dataclass
class SinkStats:
    """Per-layer VAR statistics of the last forward (``last_sink_stats(model)``)."""

    layers: list[LayerSinkStats] = field(default_factory=list)


_SINK_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> SinkStats of its last forward


def last_sink_stats(model) -> SinkStats | None:
    return _SINK_STATS.get(model)


class _Tokens:
    """Token bookkeeping of one installation on a VLM: the prefill's image and padding masks (B, N) over original
    positions, and which of them each decoder layer's keys are (its prefill tokens, the kept ones under pruning,
    then the tokens decoded since)."""

    def __init__(self, model, method: str):
        family = vlm_family(model, method)
        self.model, self.method = weakref.ref(model), method
        self.image_ids = torch.tensor([model.config.image_token_id] + ([model.config.video_token_id] if family.video
                                                                         else []))
        self.image_mask = self.padding = None
        self.prefill = False

    def begin(self, module, args, kwargs):
        """Pre-hook on the VLM core."""
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        cache = cache_argument(kwargs)
        self.prefill = cache is None or cache_length(cache) == 0
        if self.prefill:
            if input_ids is None:
                raise ValueError(f"{self.method} finds image tokens in input_ids; this forward got inputs_embeds only")
            self.image_mask = torch.isin(input_ids, self.image_ids.to(input_ids.device))
            mask = kwargs.get(ATTENTION_MASK)
            self.padding = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            self.start()

    def start(self) -> None:
        """A prefill begins."""

    def positions(self, index: int, device) -> torch.Tensor:
        """(B, N_i) original positions of decoder layer ``index``'s prefill keys."""
        batch, n = self.image_mask.shape
        kept = next((p for p in stage_positions(self.model(), index)[:1] if p is not None), None)
        return torch.arange(n, device=device).expand(batch, n) if kept is None else kept.to(device)

    def keys(self, values: torch.Tensor, index: int, kv_len: int) -> torch.Tensor:
        """(B, kv_len) per-key values of layer ``index`` from per-position ``values`` (B, N) bool of the prefill;
        keys decoded since get False."""
        taken = values.gather(1, self.positions(index, values.device))
        pad = torch.zeros(taken.shape[0], max(0, kv_len - taken.shape[1]), dtype=taken.dtype, device=taken.device)
        return torch.cat([taken, pad], 1)[:, -kv_len:]


class _VARState(_Tokens):
    """One VAR installation: the token bookkeeping, and per layer the sink scores phi of every original position
    found in the prefill (decode steps reuse them)."""

    def __init__(self, model, config: VAR):
        super().__init__(model, "VAR")
        self.config = config
        self.dims: torch.Tensor | None = None  # (B, n_dims) sink dims per sample
        self.phi: dict[int, torch.Tensor] = {}  # layer -> (B, N) phi of each original position (-1: not seen)

    def begin(self, module, args, kwargs):
        super().begin(module, args, kwargs)
        _SINK_STATS[self.model()] = SinkStats()

    def start(self) -> None:
        self.phi, self.dims = {}, None

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
        """(B, kv_len) sink keys and image keys of layer ``index``."""
        real = torch.ones_like(self.image_mask) if self.padding is None else self.padding
        sink = (self.phi[index].to(device) > self.config.tau) & real.to(device)
        return self.keys(sink, index, kv_len), self.keys(self.image_mask.to(device), index, kv_len)


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
        layer.visual_sink_keys = (sink & image).cpu()
        layer.visual_sinks += int((sink & image).sum())
        layer.text_sinks += int((sink & ~image).sum())
        if chosen is not None:
            layer.rows += int(chosen.sum())
            layer.mass_moved += float(torch.where(chosen, moved, 0.0).sum())


@register_installer(VAR)
def install_var(model, config: VAR):
    chosen = _decoder_range(model, config, "VAR")
    layers = vlm_family(model, "VAR").text_layers(model)
    text_attention.check(model, "VAR")
    state = _VARState(model, config)
    with installing() as changes:
        changes.add(text_attention.use(model, "VAR"))
        changes.add(model.model.register_forward_pre_hook(state.begin, with_kwargs=True).remove)
        changes.add(lambda: _SINK_STATS.pop(model, None))
        for i in chosen:
            if getattr(layers[i].self_attn, "sliding_window", None) is not None:
                continue
            changes.add(layers[i].register_forward_pre_hook(state.layer_hook(i), with_kwargs=True).remove)
            changes.add(text_attention.add_op(layers[i].self_attn, VisualSinkRedistribution(state, i)))
    return changes.undo


class ImageLogitExcitation:
    """Row op of one decoder layer (PAI): each sample's last query row is recomputed with its image-key logits
    z -> z + alpha |z| (keys the layer's mask hides stay hidden)."""

    def __init__(self, tokens: _Tokens, index: int, alpha: float):
        self.tokens, self.index, self.alpha = tokens, index, alpha

    def replace_rows(self, module, query, key, value, attention_mask, out) -> None:
        if self.alpha == 0.0 or self.tokens.image_mask is None:
            return
        batch, heads, q_len, _ = query.shape
        kv_len, kv_heads = key.shape[2], key.shape[1]
        image = self.tokens.keys(self.tokens.image_mask.to(query.device), self.index, kv_len)  # (B, Nk)
        seen = text_attention.dense_visibility(attention_mask, batch, q_len, kv_len, query.device)[:, 0, -1]
        scale = module.scaling if hasattr(module, "scaling") else query.shape[-1] ** -0.5
        q = query[:, :, -1].float().view(batch, kv_heads, heads // kv_heads, 1, -1)
        z = (q @ key.float()[:, :, None].transpose(-1, -2)).view(batch, heads, kv_len) * scale
        z = torch.where(image[:, None, :], z + self.alpha * z.abs(), z)
        z = z.masked_fill(~seen.expand(batch, kv_len)[:, None, :], float("-inf"))
        p = torch.softmax(z, dim=-1).view(batch, kv_heads, heads // kv_heads, 1, kv_len)
        row = (p @ value.float()[:, :, None]).view(batch, heads, -1)
        out[:, -1] = row.to(out.dtype)


def _decoder_range(model, config, method: str) -> range:
    layers = vlm_family(model, method).text_layers(model)
    last = len(layers) - 1 if getattr(config, "last_layer", None) is None else config.last_layer
    for name, value in (("first_layer", config.first_layer), ("last_layer", last)):
        if not value < len(layers):
            raise ValueError(f"{name}={value} is out of range for {type(model).__name__}: its language model has "
                             f"{len(layers)} layers; expected 0 <= {name} <= {len(layers) - 1}")
    return range(config.first_layer, last + 1)


@register_installer(PAI)
def install_pai(model, config: PAI):
    chosen = _decoder_range(model, config, "PAI")
    text_attention.check(model, "PAI")
    layers = vlm_family(model, "PAI").text_layers(model)
    tokens = _Tokens(model, "PAI")
    with installing() as changes:
        changes.add(text_attention.use(model, "PAI"))
        changes.add(model.model.register_forward_pre_hook(tokens.begin, with_kwargs=True).remove)
        for i in chosen:
            changes.add(text_attention.add_op(layers[i].self_attn, ImageLogitExcitation(tokens, i, config.alpha)))
    return changes.undo


class SinkCalibration:
    """Row op of one decoder layer (ACT) on ``heads`` (bool (H,)): all rows of those heads are recomputed with the
    sinks found in the prefill down to ``beta`` and the rest scaled up to fill the row:
    o' = beta o_S + (1 + (1 - beta) m_S / (1 - m_S)) (o - o_S), with o_S and m_S the sinks' share of the output and
    of the mass (recomputed from their columns and the rows' log-normaliser)."""

    def __init__(self, config: ACT, heads: torch.Tensor):
        self.config, self.heads = config, heads
        self.sinks: torch.Tensor | None = None  # (B, H, N) of the layer's prefill keys

    def replace_rows(self, module, query, key, value, attention_mask, out) -> None:
        if self.config.beta == 1.0:
            return
        batch, heads, q_len, _ = query.shape
        kv_len, kv_heads = key.shape[2], key.shape[1]
        seen = text_attention.dense_visibility(attention_mask, batch, q_len, kv_len, query.device)
        scale = module.scaling if hasattr(module, "scaling") else query.shape[-1] ** -0.5
        block_mask = BlockMask.from_dense(seen.expand(batch, 1, q_len, kv_len))
        _, lse = kernels.attention(query, key, value, scale=scale, block_mask=block_mask, return_lse=True)
        if self.sinks is None or q_len == kv_len:  # a prefill: find the sinks
            real_rows = seen.expand(batch, 1, q_len, kv_len).any(-1)[:, 0]
            received = kernels.column_sums(query, key, lse, real_rows, scale=scale, block_mask=block_mask)
            viewers = seen.expand(batch, 1, q_len, kv_len).sum(2).float()  # (B, 1, Nk)
            sinks = received / viewers.clamp_min(1) > self.config.threshold
            first = sinks.int().argmax(-1, keepdim=True)
            sinks.scatter_(-1, first, False)  # the first sink found stays (the official code's [1:])
            self.sinks = sinks & self.heads.to(query.device)[None, :, None]
        sinks = torch.cat([self.sinks, self.sinks.new_zeros(batch, heads, max(0, kv_len - self.sinks.shape[-1]))],
                          -1)[..., -kv_len:]
        count = int(sinks.sum(-1).max())
        if count == 0:
            return
        columns = torch.where(sinks, torch.arange(kv_len, device=query.device), kv_len).sort(-1).values[..., :count]
        valid = columns < kv_len
        columns = columns.clamp_max(kv_len - 1)  # (B, H, S)
        rep = heads // kv_heads
        k = key.repeat_interleave(rep, 1).float().gather(2, columns[..., None].expand(-1, -1, -1, key.shape[-1]))
        v = value.repeat_interleave(rep, 1).float().gather(2, columns[..., None].expand(-1, -1, -1, value.shape[-1]))
        s = query.float() @ k.transpose(-1, -2) * scale  # (B, H, Nq, S)
        visible = seen.expand(batch, heads, q_len, kv_len).gather(3, columns[:, :, None, :].expand(-1, -1, q_len, -1))
        p = torch.where(visible & valid[:, :, None, :], (s - lse[..., None]).exp(), 0.0)
        mass = p.sum(-1, keepdim=True)
        o_sink = p @ v
        o = out.transpose(1, 2).float()  # (B, H, Nq, D)
        rest = 1 + (1 - self.config.beta) * mass / (1 - mass).clamp_min(1e-12)
        new = self.config.beta * o_sink + rest * (o - o_sink)
        chosen = self.heads.to(query.device)
        out[:, :, chosen] = new[:, chosen].transpose(1, 2).to(out.dtype)


@register_installer(ACT)
def install_act(model, config: ACT):
    return install_head_ops(model, config.heads, "ACT", lambda heads: SinkCalibration(config, heads))


class _VHRState(_Tokens):
    """One VHR installation: the text-only pass's last-token head outputs per layer, and per layer the heads
    chosen in the prefill, (B, H) bool."""

    def __init__(self, model, config: VHR, heads: int):
        super().__init__(model, "VHR")
        self.config, self.heads = config, heads
        self.reference: dict[int, torch.Tensor] = {}
        self.chosen: dict[int, torch.Tensor] = {}
        self.recording = False

    def begin(self, module, args, kwargs):
        if self.recording:
            return None
        super().begin(module, args, kwargs)
        if self.prefill:
            self.reference, self.chosen = {}, {}
            if bool(self.image_mask.any()):
                self._text_only_pass(module, kwargs["input_ids"] if "input_ids" in kwargs else args[0])
        return None

    def _text_only_pass(self, core, input_ids: torch.Tensor) -> None:
        """The prompts without their image tokens, left-padded, through the core (its other hooks see a text-only
        prefill; they run again, for the image pass, after this one)."""
        real = torch.ones_like(input_ids, dtype=torch.bool) if self.padding is None else self.padding.to(input_ids.device)
        rows = [ids[keep] for ids, keep in zip(input_ids, real & ~self.image_mask.to(input_ids.device))]
        length = max(len(r) for r in rows)
        pad = self.model().config.text_config.pad_token_id or 0
        ids = torch.full((len(rows), length), pad, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, length - len(r):], mask[b, length - len(r):] = r, 1
        self.recording = True
        try:
            with torch.no_grad():
                core(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            self.recording = False

    def output_hook(self, index: int):
        """Pre-hook on layer ``index``'s ``o_proj``: records (text-only pass), chooses (image prefill), scales."""

        def hook(module, args):
            x = args[0]
            batch, n = x.shape[:2]
            heads = x.view(batch, n, self.heads, -1)
            if self.recording:
                self.reference[index] = heads[:, -1].detach()
                return None
            if self.prefill and index not in self.chosen and index in self.reference:
                self.chosen[index] = vision_aware_heads(heads[:, -1], self.reference[index])
            chosen = self.chosen.get(index)
            if chosen is None or self.config.alpha == 1.0:
                return None
            scale = torch.where(chosen.to(x.device), self.config.alpha, 1.0).to(x.dtype)
            return ((heads * scale[:, None, :, None]).view_as(x),)

        return hook


def vision_aware_heads(with_image: torch.Tensor, text_only: torch.Tensor) -> torch.Tensor:
    """(B, H) bool: VHD = ||A(image) - A(text only)|| per head of (B, H, D) outputs, zeroed where both VHD and the
    squared text-only norm exceed their mean + std over the layer's heads, then above the layer's median."""
    vhd = (with_image.float() - text_only.float()).norm(dim=-1)
    norm = text_only.float().square().sum(-1)

    def high(v):
        return v > v.mean(1, keepdim=True) + v.std(1, keepdim=True)

    vhd = torch.where(high(vhd) & high(norm), 0.0, vhd)
    return vhd > vhd.median(dim=1, keepdim=True).values


@register_installer(VHR)
def install_vhr(model, config: VHR):
    layers = vlm_family(model, "VHR").text_layers(model)
    n = len(layers)
    chosen = config.layers if config.layers is not None else tuple(sorted({1, *range(max(0, n - 14), n)} & set(range(n))))
    bad = [i for i in chosen if i >= n]
    if bad:
        raise ValueError(f"layers={list(config.layers)}: {type(model).__name__}'s language model has {n} layers "
                         f"(0-{n - 1}); got {bad}")
    state = _VHRState(model, config, model.config.text_config.num_attention_heads)
    with installing() as changes:
        # first among the core's pre-hooks: the text-only pass runs before the other methods set up the image pass
        changes.add(model.model.register_forward_pre_hook(state.begin, with_kwargs=True, prepend=True).remove)
        for i in chosen:
            changes.add(layers[i].self_attn.o_proj.register_forward_pre_hook(state.output_hook(i)).remove)
    return changes.undo
