"""Visual token pruning for transformers VLMs: FastV (arXiv 2403.06764), PyramidDrop (arXiv 2410.17247),
SparseVLM-style text-guided pruning (arXiv 2410.04417) and DivPrune (arXiv 2503.02175).

One engine runs them all as stages: at a stage's layer K the image tokens still kept are ranked and the top
``keep`` remain from layer K on. A stage's scorer ranks them:

* ``last_query`` (FastV; PyramidDrop repeats it at several layers L_1 < L_2 < ...): the last query's
  attention at layer K - 1, mean over heads;
* ``text`` (SparseVLM): the attention that text "rater" tokens give them at layer K - 1 (per-group masses
  from ``kernels.grouped_attention`` pick the raters, ``kernels.column_sums`` sums their rows);
* ``diversity`` (DivPrune): greedy max-min cosine diversity of layer K's input (K = 0: the projected
  visual embeddings), chosen in layer K's pre-hook.

Below, "layer K" stands for each stage's layer; FastV's description holds for every attention scorer.

FastV ranks the image tokens by the attention the last query gives them at decoder layer K-1 (mean
over heads) and drops all but the top ones from layer K on. Nothing runs eager attention:

* the text model's attention implementation becomes ``"mmattn_fastv"``: transformers' SDPA path as
  before, plus, in layer K-1 of a pruned prefill, the last query's row of probabilities from the
  kernels' saved LSE (``mmattn.kernels.attention(..., return_lse=True)`` then ``row_probs``);
* forward pre-hooks on layers >= K gather, per sample, the kept positions of the hidden states (at
  layer K), of the rotary (cos, sin), of the position ids and of the mask rows and columns. Kept tokens
  keep their original positions (RoPE, Qwen2-VL's M-RoPE). Each layer's own mask is sliced, so Gemma 3's
  sliding-window and full-attention layers, its bidirectional image blocks and PaliGemma's prefix-LM
  mask all hold over the kept tokens as they did over all of them. The scoring query sees the keys its
  row of the scoring layer's mask allows (a sliding-window scoring layer scores only image tokens in
  its window; the others score 0).
* the cache of layers >= K then holds only kept tokens (a sliding-window layer: the last window - 1 of
  them). transformers sizes decode masks for a full-length cache (or, with Gemma 3, for the first
  full-attention layer's cache, which may be pruned), so in decode steps the hooks rebuild each pruned
  layer's mask over the keys its cache returns: causal, padding and sliding window by original position.

Image tokens are the ``image_token_id`` positions, and the ``video_token_id`` ones (video frames of LLaVA-OneVision
and Qwen2-VL / Qwen2.5-VL; VisionZip scores images only), wherever they lie: LLaVA-OneVision's row-newline
features and SmolVLM / Idefics3's split tile spans included; everything else is always kept.
A forward prunes when its ``input_ids`` hold image tokens: the prefill, or a later prefill chunk after cached
tokens (the next turn of a chat with a new image), whose image tokens are ranked and dropped the same way while each
pruned layer keeps what it cached before (its masks span those held tokens and the chunk's kept ones).

``positions="compact"`` re-indexes the rotary positions of the kept tokens without gaps, as most official codes do:
a forward hook records the text model's ``rotary_emb`` calls, and the pruned layers get (cos, sin) recomputed at
:func:`compact_positions` (decode steps: their positions less the stage's shift). Masks keep original positions.
"""

from __future__ import annotations

import functools
import inspect
import time
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from mmattn import kernels, text_attention
from mmattn._compat import (
    ATTENTION_MASK,
    POSITION_EMBEDDINGS,
    POSITION_IDS,
    AttentionInterface,
    AttentionMaskInterface,
    cache_argument,
    cache_length,
    anyres_tile_counts,
    count_extra_tokens,
    get_vision_window_index,
    output_cache,
    query_key,
    sdpa_attention_forward,
    cached_keys,
    sdpa_mask,
    stored_keys,
)
from mmattn.adapters import supported_vlms, vlm_family
from mmattn.api import installing, register_installer
from mmattn.configs import DivPrune, FastV, PyramidDrop, SparseVLM, VisionZip
from mmattn.kernels import BlockMask

IMPLEMENTATION = text_attention.IMPLEMENTATION  # the text model's attention while pruning is applied
ATTENTION_SCORERS = ("last_query", "text")  # score at layer K - 1, inside its attention


@dataclass
class StageStats:
    """One stage of the last pruned prefill: ``layer`` (the first layer it prunes), ``image_positions``
    (B, n) the image tokens still kept entering it, ``image_scores`` (B, n) the attention the last query gave
    them at ``layer - 1`` (mean over heads), ``kept_image_positions`` (B, k) those kept from ``layer`` on."""

    layer: int
    image_positions: torch.Tensor
    image_scores: torch.Tensor
    kept_image_positions: torch.Tensor


class _Interval:
    """One forward's time: ``perf_counter`` on CPU; on CUDA two events, so nothing synchronises while the model
    runs (the first read of ``seconds`` waits for the end event)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.begin = self._now()
        self.end = None

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self) -> _Interval:
        self.end = self._now()
        return self

    @property
    def seconds(self) -> float:
        if not self.cuda:
            return self.end - self.begin
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1000


@dataclass
class PruningStats:
    """What the last pruned prefill did, per sample, and how long it took.

    ``tokens_per_layer``: tokens entering each decoder layer (per sample, fillers included: see
    ``_PruneState.choose``); ``image_positions`` (B, n_image) and ``image_scores`` (B, n_image): the image tokens and
    the first stage's scores of them (see :class:`StageStats`); ``kept_image_positions`` (B, k): the image tokens kept
    after the last stage, ascending; ``stages``: each stage's own choice. Where samples hold different numbers of
    image tokens (or keep different numbers), shorter rows end in -1 positions and NaN scores. ``prefill_seconds``: time of the prefill's forward through the
    VLM core (vision tower and decoder layers, not the LM head); ``decode_seconds`` and ``decode_steps``: the same
    summed over the decode forwards since. On CUDA the times are device times between two events, read when
    asked for: nothing synchronises while the model runs.
    """

    tokens_per_layer: list[int]
    image_positions: torch.Tensor
    image_scores: torch.Tensor
    kept_image_positions: torch.Tensor
    stages: list[StageStats]
    prefill: _Interval | None = field(default=None, repr=False)
    decodes: list[_Interval] = field(default_factory=list, repr=False)

    @property
    def prefill_seconds(self) -> float:
        return 0.0 if self.prefill is None else self.prefill.seconds

    @property
    def decode_seconds(self) -> float:
        return sum(interval.seconds for interval in self.decodes)

    @property
    def decode_steps(self) -> int:
        return len(self.decodes)

    @property
    def equivalent_tokens(self) -> float:
        """Tokens averaged over the layers: the sequence length of an unpruned model of equal cost."""
        return sum(self.tokens_per_layer) / len(self.tokens_per_layer)


_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> PruningStats
_SCORING_LAYERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> _PruneState
_PRUNED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> the pruning method applied
_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its _PruneState


def stage_positions(model, layer: int) -> list[torch.Tensor | None]:
    """The original positions (B, N) of the prefill tokens that decoder ``layer`` may receive under the pruning
    applied to ``model``: [its stage's kept tokens, the tokens before that stage]; None entries stand for every
    token. Empty without pruning. (A hook that runs before pruning's own at a stage's first layer sees the tokens
    before the stage.)"""
    state = _STATES.get(model)
    if state is None:
        return []
    stages = [j for j, (start, _, _) in enumerate(state.stages) if start <= layer]
    if not stages:
        return [None]
    stage = stages[-1]
    return [state.kept_stages[stage], state.kept_stages[stage - 1] if stage else None]


def last_stats(model) -> PruningStats | None:
    """Statistics of the last prefill that a pruning method pruned on ``model`` (None before the first)."""
    return _STATS.get(model)


def top_image_tokens(image_scores: torch.Tensor, image_positions: torch.Tensor, budget: int) -> torch.Tensor:
    """Positions (B, budget), ascending, of each sample's ``budget`` highest-scoring image tokens."""
    top = image_scores.topk(budget, dim=1).indices
    return image_positions.gather(1, top).sort(dim=1).values


def _take(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Per sample b, the entries ``index[b]`` of ``x[b]`` along ``dim``; a batch of 1 in ``x`` broadcasts."""
    x = x.expand(index.shape[0], *x.shape[1:])
    view = [index.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = index.shape[1]
    size = list(x.shape)
    size[dim] = index.shape[1]
    return x.gather(dim, index.to(x.device).view(view).expand(size))


class _PruneState:
    """One pruning installation: what the current forward does and which tokens the last prefill kept at each
    stage."""

    def __init__(self, config, stages: list[tuple[int, float | int, str]], model, num_layers: int,
                 visual_token_ids: list[int]):
        self.config = config  # the method config applied
        self.stages = stages  # [(layer, keep, scorer)], layers strictly increasing
        self.model = weakref.ref(model)
        self.num_layers = num_layers
        self.visual_token_ids = torch.tensor(visual_token_ids)  # image (and video) token ids: the prunable tokens
        self.prefill = False  # the current forward is a prefill with image tokens
        self.next_stage: int | None = None  # ... whose stage next_stage has not chosen yet (None: nothing to choose)
        self.image_mask: torch.Tensor | None = None  # (B, N) of the prefill
        self.padding_mask: torch.Tensor | None = None  # (B, N) 2D attention mask of the prefill, if any
        self.kept_stages: list[torch.Tensor | None] = [None] * len(stages)  # per stage: (B, N_i) ascending positions
        self.gather: list[torch.Tensor | None] = [None] * len(stages)  # per stage: indices of kept[i] in kept[i-1]
        self.n_images: torch.Tensor | None = None  # (B,) image tokens of each sample in the prefill
        self.fillers: list[torch.Tensor | None] = [None] * len(stages)  # per stage: (B, N) bool, see choose()
        self.stage_stats: list[StageStats] = []
        # Chunks: a prefill with image tokens after cached tokens (a later turn of a chat) is pruned too. The current
        # chunk's tokens are at original positions offset .. offset + prefill_len; kept_stages and fillers count
        # from offset. ``held[i]`` (B, M): the original positions the caches of stage i's layers hold from earlier
        # chunks (and the tokens decoded between); ``held_fillers[i]`` (B, offset): which of those are fillers.
        self.offset = 0
        self.held: list[torch.Tensor | None] = [None] * len(stages)
        self.held_fillers: list[torch.Tensor | None] = [None] * len(stages)
        self.layer0_extra = 0  # tokens layer 0's cache stands for beyond those it stores (a layer-0 stage)
        self.prefill_len = 0
        self.end = 0  # original positions of the current forward end here (exclusive)
        self.decoding = False  # the current forward has cached tokens and no image tokens
        # positions="compact": per stage, (B,) how far the kept tokens' rotary positions moved down (decode steps
        # move by it); the rotary embedding's calls of the current forward; their compact (cos, sin) per stage.
        self.compact = config.positions == "compact"
        self.shift: list[torch.Tensor | None] = [None] * len(stages)
        self.shift_before: list[torch.Tensor | None] = [None] * len(stages)  # ... as the earlier chunks left it
        self.rotary_calls: list[tuple[torch.Tensor, torch.nn.Module, dict]] = []
        self.embeddings_cache: dict = {}
        self.decode_padding: torch.Tensor | None = None  # decode: 2D attention mask over original positions
        self.interval: _Interval | None = None  # the current forward's time
        self.timed: PruningStats | None = None  # the stats of the last prefill if it pruned: its decode steps add up
        # VisionZip, per kind of visual token ("image", "video"): ``collecting`` names the kind whose
        # get_image_features / get_video_features runs (its scoring layer records patch scores), ``vision_scores``
        # one (B_i, N_i) tensor per attention call, ``vision_call`` the features call's arguments, ``to_features``
        # the function mapping both to one flat score per LLM token of that kind, ``kind_masks`` (B, N) the tokens.
        self.collecting: str | None = None
        self.vision_scores: dict[str, list[torch.Tensor]] = {}
        self.vision_call: dict[str, dict] = {}
        self.to_features: dict = {}
        self.kind_ids = dict(zip(("image", "video"), visual_token_ids))
        self.kind_masks: dict[str, torch.Tensor] = {}

    def begin(self, module, args, kwargs):
        """Pre-hook on the VLM core: a prefill with image tokens prunes; a decode step reuses its choice."""
        self.interval = _Interval(next(module.parameters()).device)
        self.rotary_calls, self.embeddings_cache = [], {}
        input_ids = kwargs["input_ids"] if "input_ids" in kwargs else (args[0] if args else None)
        cache = cache_argument(kwargs)
        visual = None if input_ids is None else torch.isin(input_ids, self.visual_token_ids.to(input_ids.device))
        has_images = visual is not None and bool(visual.any())
        # Layer 0's cache counts every token (a layer-0 stage makes it say so: see finish()).
        past = cache_length(cache) if cache is not None else 0
        length = input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1]
        mask = _padding_mask(kwargs.get(ATTENTION_MASK))
        self.end = past + length
        self.decoding = past > 0 and not has_images
        if self.decoding:  # a decode step (or a chunk of text): the earlier choices hold
            self.prefill, self.next_stage = False, None
            self.decode_padding = mask
            return None
        if input_ids is None:
            raise ValueError(f"{self.config.name} finds image tokens in input_ids; this forward got inputs_embeds only")
        if past == 0:
            self.held = [None] * len(self.stages)
            self.held_fillers = [None] * len(self.stages)
            self.shift = [None] * len(self.stages)
            self.layer0_extra = 0
        else:  # a later chunk with images: what the earlier ones left in the caches stays
            self.hold(past, input_ids.shape[0], input_ids.device)
        self.shift_before = list(self.shift)
        if mask is not None and mask.shape[1] == length and past:  # a mask of the chunk alone
            mask = torch.cat([mask.new_ones(mask.shape[0], past), mask], dim=1)
        self.decode_padding = mask  # over every original position so far
        self.prefill, self.offset = has_images, past
        self.next_stage = 0 if has_images else None
        self.kept_stages = [None] * len(self.stages)
        self.gather = [None] * len(self.stages)
        self.fillers = [None] * len(self.stages)
        self.stage_stats = []
        self.image_mask = visual
        self.kind_masks = {kind: input_ids == token for kind, token in self.kind_ids.items()}
        self.padding_mask = None if mask is None else mask[:, past:]
        self.prefill_len = length
        return None

    def hold(self, past: int, batch: int, device) -> None:
        """Before a later chunk at original position ``past``: each stage's layers hold what they held, the last
        pruned chunk's kept tokens and every token after it (every token, where nothing was pruned yet)."""
        for i in range(len(self.stages)):
            if self.held[i] is None:
                held = torch.zeros(batch, 0, dtype=torch.long, device=device)
                hidden, covered = torch.zeros(batch, 0, dtype=torch.bool, device=device), 0
            else:
                held, hidden, covered = self.held[i], self.held_fillers[i], self.offset
            if self.kept_stages[i] is not None:
                held = torch.cat([held, self.offset + self.kept_stages[i].to(device).expand(batch, -1)], dim=1)
                fillers = self.fillers[i]
                hidden = torch.cat([hidden, fillers.to(device) if fillers is not None else
                                    torch.zeros(batch, self.prefill_len, dtype=torch.bool, device=device)], dim=1)
                covered = self.offset + self.prefill_len
            after = torch.arange(covered, past, device=device).expand(batch, -1)
            self.held[i] = torch.cat([held, after], dim=1)
            self.held_fillers[i] = F.pad(hidden, (0, past - hidden.shape[1]))

    def finish(self, module, args, kwargs, output):
        """Forward hook on the VLM core: record the time; after a prefill that pruned layer 0, make layer 0's cache
        report every token it stands for (transformers takes positions and generate()'s new tokens from it)."""
        interval = self.interval.stop()
        if not self.decoding:  # a prefill (or a later chunk with images): its decode steps count toward its stats
            self.timed = _STATS[self.model()] if self.prefill else None
            if self.timed is not None:
                self.timed.prefill = interval
                cache = output_cache(output)
                if self.stages[0][0] == 0 and cache is not None:
                    self.layer0_extra += self.prefill_len - self.kept_stages[0].shape[1]
                    count_extra_tokens(cache, 0, self.layer0_extra)
        elif self.timed is not None:
            self.timed.decodes.append(interval)

    def _current(self, stage: int, batch: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``n`` tokens entering stage ``stage``: their original positions, which are image tokens still in the
        running and which are real (neither padding nor an earlier stage's filler), each (B, n)."""
        image_mask = self.image_mask.to(device)
        if stage == 0:
            self.n_images = image_mask.sum(dim=1)
            positions = torch.arange(n, device=device).expand(batch, n)
        else:
            positions = self.kept_stages[stage - 1].to(device)
            image_mask = image_mask.gather(1, positions)
        real = torch.ones(batch, n, dtype=torch.bool, device=device) if self.padding_mask is None \
            else self.padding_mask.to(device).bool().gather(1, positions)
        if stage > 0 and self.fillers[stage - 1] is not None:
            real = real & ~self.fillers[stage - 1].to(device).gather(1, positions)
            image_mask = image_mask & real
        return positions, image_mask, real

    def select(self, stage: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
               attention_mask: torch.Tensor | None) -> None:
        """Attention scorers, in layer K - 1's attention: score the image tokens still kept and choose.

        The scoring layer sees the tokens the previous stage kept (all of them for the first stage), so the
        queries, keys and mask are over those. A scoring query sees the keys its row of the layer's own mask
        allows (sliding window, prefix-LM or bidirectional image blocks included); with no mask, every real
        token up to it."""
        batch, _, n, _ = query.shape
        prefix = key.shape[2] - n  # keys the layer holds from earlier chunks (a later chunk of a chat)
        positions, image_mask, real = self._current(stage, batch, n, query.device)
        last = n - 1 - real.flip(1).int().argmax(dim=1)
        scores = torch.zeros(batch, prefix + n, dtype=torch.float32, device=query.device)
        for b in range(batch):
            if self.stages[stage][2] == "last_query":
                rows = last[b:b + 1]
            else:  # text raters: real text tokens after the first image token
                after_image = torch.arange(n, device=query.device) > image_mask[b].int().argmax()
                rows = (real[b] & ~image_mask[b] & after_image).nonzero().squeeze(1)
            real_keys = F.pad(real[b], (prefix, 0), value=True)
            if attention_mask is not None:
                visible = text_attention.visible(attention_mask[b if attention_mask.shape[0] > 1 else 0, 0, rows])
                visible = visible & real_keys
            else:
                visible = real_keys & (torch.arange(prefix + n, device=query.device) <= prefix + rows[:, None])
            q, k, v = query[b:b + 1, :, rows], key[b:b + 1], value[b:b + 1]
            if self.stages[stage][2] == "last_query":
                keys = visible[0].nonzero().squeeze(1)
                k, v = k[:, :, keys], v[:, :, keys]
                _, lse = kernels.attention(q, k, v, scale=scale, return_lse=True)
                scores[b, keys] = kernels.row_probs(q, k, lse, scale=scale)[0, :, 0].mean(dim=0)
            elif len(rows):
                scores[b] = _rater_scores(q, k, v, scale, visible, F.pad(image_mask[b], (prefix, 0)))
        self.choose(stage, positions, image_mask, scores[:, prefix:])

    def select_by_layer_input(self, stage: int, layer, hidden: torch.Tensor, kwargs: dict) -> None:
        """PyramidDrop's official ranking, in layer K's pre-hook: layer K's own ``input_layernorm``, ``q_proj`` and
        ``k_proj`` (and RoPE) on its input; the last real token's query row of probabilities over the keys it may
        see (the layer's own mask), mean over heads, ranks the image tokens still kept."""
        batch, n, _ = hidden.shape
        positions, image_mask, real = self._current(stage, batch, n, hidden.device)
        query, key = query_key(layer.self_attn, layer.input_layernorm(hidden), self.embeddings(stage - 1, kwargs))
        mask = kwargs.get(ATTENTION_MASK)
        last = n - 1 - real.flip(1).int().argmax(dim=1)
        if self.offset:  # a later chunk: the keys the layer holds from the earlier ones come first
            held = cached_keys(cache_argument(kwargs), layer.self_attn.layer_idx)
            key = torch.cat([held.to(key.dtype), key], dim=2)
            held_visible = self.held_visible(stage, held.shape[2], self.offset + positions.gather(1, last[:, None]),
                                             getattr(layer.self_attn, "sliding_window", None))
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        scores = torch.zeros(batch, n, dtype=torch.float32, device=hidden.device)
        for b in range(batch):
            if self.offset:
                visible = torch.cat([held_visible[b], real[b] & (torch.arange(n, device=hidden.device) <= last[b])])
            elif mask is not None:
                row = mask[b if mask.shape[0] > 1 else 0, 0].index_select(0, positions[b, last[b]].view(1))
                visible = text_attention.visible(row[:, positions[b]])[0] & real[b]
            else:
                visible = real[b] & (torch.arange(n, device=hidden.device) <= last[b])
            logits = torch.einsum("hd,hnd->hn", query[b, :, last[b]], key[b]).float() * layer.self_attn.scaling
            logits = logits.masked_fill(~visible, float("-inf"))
            scores[b] = torch.softmax(logits, dim=-1)[:, -n:].mean(dim=0)
        self.choose(stage, positions, image_mask, scores)

    def held_visible(self, stage: int, stored: int, query_positions: torch.Tensor, sliding_window: int | None
                     ) -> torch.Tensor:
        """(B, stored) which of the last ``stored`` tokens that stage ``stage``'s layers hold from earlier chunks
        the queries at original ``query_positions`` (B, 1) see: no padding, no filler, within a sliding window."""
        held = self.held[stage][:, self.held[stage].shape[1] - stored:].to(query_positions.device)
        visible = ~self.held_fillers[stage].to(held.device).gather(1, held)
        if self.decode_padding is not None:
            visible = visible & self.decode_padding.to(held.device).bool().gather(1, held)
        if sliding_window is not None:
            visible = visible & (held > query_positions - sliding_window)
        return visible

    def select_diverse(self, stage: int, hidden: torch.Tensor) -> None:
        """DivPrune, in layer K's pre-hook: greedy max-min cosine diversity of the image tokens' hidden states."""
        batch, n, _ = hidden.shape
        positions, image_mask, _ = self._current(stage, batch, n, hidden.device)
        scores = torch.zeros(batch, n, dtype=torch.float32, device=hidden.device)
        for b in range(batch):
            n_current = int(image_mask[b].sum())
            budget = self.budget(stage, n_current, b)
            picked = max_min_diverse(hidden[b, image_mask[b]], budget)
            image_scores = torch.zeros(n_current, device=hidden.device)
            image_scores[picked] = torch.arange(budget, 0, -1, dtype=torch.float32, device=hidden.device)
            scores[b, image_mask[b]] = image_scores
        self.choose(stage, positions, image_mask, scores)

    def select_vision(self, stage: int, hidden: torch.Tensor) -> torch.Tensor:
        """VisionZip, in layer 0's pre-hook: rank the image tokens by the vision tower's patch scores; keep the
        dominant ones and, with ``contextual`` > 0, that many context tokens, each merged with the pruned tokens
        nearest to it (cosine of the projected embeddings) as ``config.merge`` says. Returns the hidden states."""
        self.collecting = None
        batch, n, _ = hidden.shape
        positions, image_mask, _ = self._current(stage, batch, n, hidden.device)
        scores = torch.zeros(batch, n, dtype=torch.float32, device=hidden.device)
        for kind, mask in self.kind_masks.items():
            mask = mask.to(hidden.device)
            if not mask.any():
                continue
            flat = self.to_features[kind](self.vision_scores[kind], self.vision_call[kind]).to(hidden.device,
                                                                                                torch.float32)
            if flat.numel() != int(mask.sum()):
                raise ValueError(f"VisionZip scored {flat.numel()} {kind} features; the prompts hold "
                                 f"{int(mask.sum())} {kind} tokens")
            scores[mask] = flat
        if self.config.contextual == 0:
            self.choose(stage, positions, image_mask, scores)
            return hidden
        hidden, chosen = hidden.clone(), []
        for b in range(batch):
            budget = self.budget(stage, int(self.n_images[b]), b)
            contextual = min(self.config.contextual, budget)
            image = image_mask[b].nonzero().squeeze(1)
            dominant = scores[b, image].topk(budget - contextual).indices
            rest = scores[b, image] > -float("inf")  # tokens scored -inf (row newlines) are dropped, never merged
            rest[dominant] = False
            rest = rest.nonzero().squeeze(1)
            if contextual == 0:
                chosen.append(image[dominant].sort().values)
                continue
            targets = rest[::max(1, len(rest) // contextual)][:contextual]
            others = rest[~torch.isin(rest, targets)]
            x = F.normalize(hidden[b, image].float(), dim=-1)
            nearest = (x[others] @ x[targets].T).argmax(dim=1)
            target = hidden[b, image[targets]].float()
            assigned = torch.zeros_like(target).index_add(0, nearest, hidden[b, image[others]].float())
            counts = torch.bincount(nearest, minlength=contextual)[:, None]
            if self.config.merge == "target_plus_mean":  # the official code: target + mean(assigned)
                merged = target + assigned / counts.clamp_min(1)
            else:  # "mean": the mean of the target and its assigned tokens
                merged = (target + assigned) / (1 + counts)
            hidden[b, image[targets]] = merged.to(hidden.dtype)
            chosen.append(image[torch.cat([dominant, targets])].sort().values)
        self.choose(stage, positions, image_mask, scores, chosen=chosen)
        return hidden

    def wrap_features(self, core, kind: str):
        """Collect patch scores during ``core.get_image_features`` (``kind`` "image") or ``get_video_features``
        ("video"), called by the core's forward or by generate() before the prefill, from a fresh list each call;
        returns undo."""
        attribute = f"get_{kind}_features"
        original = getattr(core, attribute)
        signature = inspect.signature(original)

        @functools.wraps(original)  # generate() reads its signature
        def get_features(*args, **kwargs):
            self.vision_scores[kind], self.collecting = [], kind
            self.vision_call[kind] = signature.bind(*args, **kwargs).arguments
            try:
                return original(*args, **kwargs)
            finally:
                self.collecting = None

        setattr(core, attribute, get_features)
        return lambda: delattr(core, attribute)

    def budget(self, stage: int, n_current: int, sample: int) -> int:
        """Image tokens stage ``stage`` keeps in ``sample`` (``n_current`` still in the running): an int keep as it
        is; a fraction of the sample's own original image tokens, rounded (PyramidDrop's official ranking: floored,
        as its code takes ``int(N * ratio)``)."""
        keep, n_image = self.stages[stage][1], int(self.n_images[sample])
        share = keep * n_image
        budget = keep if isinstance(keep, int) else int(share) if self.stages[stage][2] == "layer_input" else round(share)
        if budget == 0 and keep != 0 and n_image:
            warnings.warn(f"{self.config.name}: keep={keep} (a fraction) of {n_image} image tokens rounds to 0: no "
                          "image token is kept; pass an int to keep a count of tokens", stacklevel=2)
        return min(budget, n_current)

    def choose(self, stage: int, positions: torch.Tensor, image_mask: torch.Tensor, scores: torch.Tensor,
               chosen: list[torch.Tensor] | None = None) -> None:
        """Keep each sample's top-scoring image tokens of stage ``stage`` (or the positions ``chosen[b]``, ascending)
        and every other token; record the statistics.

        Samples whose image-token counts (or budgets) differ keep different numbers of tokens; the shorter ones are
        padded to the longest with *fillers*: some of their dropped image tokens, kept in the sequence but hidden
        from every query but their own (``fillers[stage]``, over original positions) from this stage on."""
        self.next_stage = stage + 1 if stage + 1 < len(self.stages) else None
        batch, n = positions.shape
        image_positions, image_scores, kept_images, rows = [], [], [], []
        for b in range(batch):
            candidates, candidate_scores = positions[b][image_mask[b]], scores[b][image_mask[b]]
            if chosen is None:
                budget = self.budget(stage, len(candidates), b)
                picked = top_image_tokens(candidate_scores[None], candidates[None], budget)[0]
            else:
                picked = chosen[b]
            image_positions.append(candidates)
            image_scores.append(candidate_scores)
            kept_images.append(picked)
            rows.append((positions[b][~image_mask[b]], candidates[~torch.isin(candidates, picked)]))
        length = max(len(others) + len(picked) for (others, _), picked in zip(rows, kept_images))
        kept, fillers = [], None
        for b, ((others, dropped), picked) in enumerate(zip(rows, kept_images)):
            extra = dropped[:length - len(others) - len(picked)]
            if len(extra):
                if fillers is None:
                    previous = self.fillers[stage - 1] if stage else None
                    fillers = (previous.clone() if previous is not None
                               else torch.zeros(batch, self.prefill_len, dtype=torch.bool, device=positions.device))
                fillers[b, extra] = True
            kept.append(torch.cat([others, picked, extra]).sort().values)
        kept = torch.stack(kept)
        self.fillers[stage] = fillers if fillers is not None else (self.fillers[stage - 1] if stage else None)
        self.kept_stages[stage] = kept
        self.gather[stage] = kept if stage == 0 else torch.searchsorted(positions.contiguous(), kept)
        chosen = _pad_rows([self.offset + p for p in kept_images])  # stats count from the first chunk
        self.stage_stats.append(StageStats(self.stages[stage][0], _pad_rows([self.offset + p for p in image_positions]),
                                           _pad_rows(image_scores, float("nan")), chosen))

        tokens, length = [], self.prefill_len
        for i in range(self.num_layers):  # stages not chosen yet count as keeping every token
            for j, (layer, _, _) in enumerate(self.stages[:stage + 1]):
                if layer == i:
                    length = self.kept_stages[j].shape[1]
            tokens.append(length)
        first = self.stage_stats[0]
        _STATS[self.model()] = PruningStats(
            tokens_per_layer=tokens,
            image_positions=first.image_positions,
            image_scores=first.image_scores,
            kept_image_positions=chosen,
            stages=list(self.stage_stats),
        )

    # One-stage view (FastV), as bench/bench_pruning.py's eager emulation drives it: ``selecting`` (the first
    # stage has not chosen yet) and ``kept`` (the first stage's choice; setting it replaces that choice).
    @property
    def selecting(self) -> bool:
        return self.next_stage == 0

    @selecting.setter
    def selecting(self, value: bool) -> None:
        self.next_stage = 0 if value else (None if self.next_stage == 0 else self.next_stage)

    @property
    def kept(self) -> torch.Tensor | None:
        return self.kept_stages[-1]

    @kept.setter
    def kept(self, value: torch.Tensor) -> None:
        if len(self.stages) != 1:
            raise ValueError("setting kept is for a one-stage (FastV) installation")
        self.kept_stages[0] = self.gather[0] = value

    def record_rotary(self, module, args, kwargs, output) -> None:
        """Forward hook on the text model's rotary embedding (positions="compact"): remember the call."""
        self.rotary_calls.append((output[0], module, inspect.signature(module.forward).bind(*args, **kwargs)))

    def embeddings(self, stage: int, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The (cos, sin) that the layers of ``stage`` use (-1: the layers before the first stage), from the
        model's own ``kwargs[POSITION_EMBEDDINGS]``: at the kept tokens' original positions, or (positions="compact")
        recomputed by the rotary embedding at compact positions (see :func:`compact_positions`); decode steps move
        down by the stage's shift."""
        cos, sin = kwargs[POSITION_EMBEDDINGS]
        kept = self.kept_stages[stage] if stage >= 0 else None
        if not self.compact or kept is None:
            return (cos, sin) if kept is None or not self.prefill else (_take(cos, kept, 1), _take(sin, kept, 1))
        if (stage, id(cos)) in self.embeddings_cache:
            return self.embeddings_cache[stage, id(cos)]
        call = next(((module, bound) for out, module, bound in self.rotary_calls if out is cos), None)
        if call is None:
            raise RuntimeError(f"{self.config.name}: positions='compact' found no call of the text model's rotary "
                               "embedding that made this layer's position embeddings")
        module, bound = call
        ids = bound.arguments["position_ids"]
        if self.prefill:
            batch = kept.shape[0]
            ids = ids.expand(*ids.shape[:-2], batch, ids.shape[-1])
            ids = ids.gather(-1, kept.to(ids.device).expand(*ids.shape[:-2], batch, -1))
            real = torch.ones_like(kept, dtype=torch.bool) if self.padding_mask is None \
                else self.padding_mask.to(kept.device).bool().gather(1, kept)
            if self.fillers[stage] is not None:
                real = real & ~self.fillers[stage].to(kept.device).gather(1, kept)
            ids, self.shift[stage] = compact_positions(ids, real, self.shift_before[stage])
        else:
            ids = ids - self.shift[stage].to(ids.device).view(-1, 1)
        bound = inspect.BoundArguments(bound.signature, bound.arguments.copy())
        bound.arguments["position_ids"] = ids
        self.embeddings_cache[stage, id(cos)] = module.forward(*bound.args, **bound.kwargs)
        return self.embeddings_cache[stage, id(cos)]

    def cached_mask(self, stage: int, query_positions: torch.Tensor, keys: int, sliding_window: int | None,
                    mask: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 1, Nq, keys) bool mask of a forward with cached tokens (a decode step, or a later pruned chunk) in a
        layer of stage ``stage`` whose cache returns ``keys`` keys.

        The layer's keys are the last ``keys`` of: the tokens it held from earlier chunks (``held``), those the
        last pruned chunk kept and every token since. Queries are at ``query_positions`` (B or 1, Nq), original
        positions. A key is visible when transformers' own ``mask`` allows it where that mask spans every original
        position (its query ``rows`` (B, Nq) in the current forward), else when it is at or before the query, no
        padding and, in a sliding-window layer, within the window by original position (as transformers' masks);
        never a filler, but every query sees itself.
        """
        batch, device = self.kept_stages[stage].shape[0], self.kept_stages[stage].device
        kept = self.offset + self.kept_stages[stage]
        held = self.held[stage].to(device) if self.held[stage] is not None else kept[:, :0]
        new = torch.arange(self.offset + self.prefill_len, self.end, device=device).expand(batch, -1)
        key_positions = torch.cat([held, kept, new], dim=1)[:, -keys:]  # (B, keys)
        fillers = torch.zeros(batch, self.end, dtype=torch.bool, device=device)
        if self.held_fillers[stage] is not None:
            fillers[:, :self.offset] = self.held_fillers[stage].to(device)
        if self.fillers[stage] is not None:
            fillers[:, self.offset:self.offset + self.prefill_len] = self.fillers[stage].to(device)
        if mask is not None and rows is not None and mask.shape[-1] == self.end:
            allowed = text_attention.visible(_take(_take(mask, rows, 2), key_positions, 3))
        else:
            allowed = text_attention.position_mask(query_positions, key_positions,
                                                   *_predicates(sliding_window, self.decode_padding, device))
        query = query_positions.expand(batch, -1)[:, None, :, None]
        hidden = fillers.gather(1, key_positions)[:, None, None, :]
        return (allowed & ~hidden) | (key_positions[:, None, None, :] == query)

    def filler_mask(self, mask: torch.Tensor | None, kept: torch.Tensor, fillers: torch.Tensor,
                    sliding_window: int | None) -> torch.Tensor:
        """(B, 1, n, n) bool prefill mask over the ``kept`` tokens of a layer whose stage keeps fillers: the layer's
        own mask (or, with none, causal, padding and sliding window by original position), with the filler keys
        hidden; every query still sees itself, so no row is empty."""
        device = kept.device
        hidden = _take(fillers.to(device), kept, 1)[:, None, None, :]
        if mask is not None:
            allowed = text_attention.visible(_take(_take(mask, kept, 2), kept, 3))
        else:
            allowed = text_attention.position_mask(kept, kept, *_predicates(sliding_window, self.padding_mask, device))
        itself = torch.eye(kept.shape[1], dtype=torch.bool, device=device)
        return (allowed & ~hidden) | itself

    def layer_hook(self, layer, stage: int, first: bool):
        """Pre-hook for a layer pruned by ``stage`` (the last stage whose layer is <= it); ``first`` (the stage's
        own layer) also drops the hidden states of the tokens the stage removes."""
        attention = layer.self_attn
        sliding_window = getattr(attention, "sliding_window", None)

        def hook(module, args, kwargs):
            if first and self.prefill and self.next_stage == stage and self.stages[stage][2] == "layer_input":
                self.select_by_layer_input(stage, layer, args[0], kwargs)
            if first and self.prefill and self.next_stage == stage and self.stages[stage][2] == "diversity":
                self.select_diverse(stage, args[0])
            if first and self.prefill and self.next_stage == stage and self.stages[stage][2] == "vision":
                args = (self.select_vision(stage, args[0]), *args[1:])
            kept, mask = self.kept_stages[stage], kwargs.get(ATTENTION_MASK)
            if kept is None:
                return None
            if self.prefill:
                if first:  # the decoder layers take hidden_states positionally (over the previous stage's tokens)
                    args = (_take(args[0], self.gather[stage], 1), *args[1:])
                if not self.compact:
                    kwargs[POSITION_EMBEDDINGS] = self.embeddings(stage, kwargs)
                if kwargs.get(POSITION_IDS) is not None:
                    kwargs[POSITION_IDS] = _take(kwargs[POSITION_IDS], kept, 1)
                fillers = self.fillers[stage]
                if self.offset:  # a later chunk: the layer also sees what it holds from the earlier ones
                    stored = stored_keys(cache_argument(kwargs), attention.layer_idx)
                    kwargs[ATTENTION_MASK] = self.cached_mask(stage, self.offset + kept, stored + kept.shape[1],
                                                              sliding_window, mask, kept)
                elif fillers is not None:
                    kwargs[ATTENTION_MASK] = self.filler_mask(mask, kept, fillers, sliding_window)
                elif mask is not None:
                    kwargs[ATTENTION_MASK] = _take(_take(mask, kept, 2), kept, 3)
            else:
                # Decode: transformers sized the mask for a full-length cache (or, when the first full-attention
                # layer is pruned, for the pruned one), while this layer's cache holds kept tokens only (a
                # sliding layer: the last window - 1 of them). Rebuild the mask over the keys it will return.
                queries = args[0].shape[1] if args else kwargs["hidden_states"].shape[1]
                stored = stored_keys(cache_argument(kwargs), attention.layer_idx)
                query_positions = torch.arange(self.end - queries, self.end, device=kept.device)[None]
                kwargs[ATTENTION_MASK] = self.cached_mask(stage, query_positions, stored + queries, sliding_window)
            if self.compact:
                kwargs[POSITION_EMBEDDINGS] = self.embeddings(stage, kwargs)
            return args, kwargs

        return hook


def _predicates(sliding_window: int | None, padding: torch.Tensor | None, device) -> list:
    """Mask predicates over original positions, as transformers builds a layer's mask: causal, the sliding window
    where the layer has one, not padding (``padding``: the 2D mask) where there is some."""
    predicates = [text_attention.causal]
    if sliding_window is not None:
        predicates.append(text_attention.sliding_window(sliding_window))
    if padding is not None:
        predicates.append(text_attention.not_padding(padding.to(device)))
    return predicates


def compact_positions(ids: torch.Tensor, real: torch.Tensor, before: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact rotary positions of kept tokens and how far they moved: ``ids`` (..., B, n) their original position
    ids (M-RoPE's axes first), ``real`` (B, n) which are neither padding nor fillers. Per sample, the values the
    real tokens use (over every axis) map to consecutive values from the first one, less ``before`` (B,) (an
    earlier chunk's shift); returns (the ids so mapped, (B,) the shift a later token's position takes)."""
    out = ids.clone()
    shift = torch.zeros(ids.shape[-2], dtype=ids.dtype, device=ids.device) if before is None else before.clone()
    for b in range(ids.shape[-2]):
        row = ids[..., b, :]
        used = row[..., real[b]].unique()
        if len(used) == 0:
            continue
        start = used[0] - shift[b]
        out[..., b, :] = start + torch.searchsorted(used, row.contiguous()).clamp_max(len(used) - 1)
        shift[b] = used[-1] - (start + len(used) - 1)
    return out, shift


def _pad_rows(rows: list[torch.Tensor], value: float = -1) -> torch.Tensor:
    """(B, longest) rows of different lengths, the shorter padded with ``value`` at the end."""
    longest = max(len(row) for row in rows)
    return torch.stack([F.pad(row, (0, longest - len(row)), value=value) for row in rows])


def _rater_scores(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, visible: torch.Tensor,
                  image_mask: torch.Tensor) -> torch.Tensor:
    """SparseVLM-style scores (Nk,) of one sample: the rows ``q`` (1, H, R, D) are candidate raters, ``visible``
    (R, Nk) what each sees. Their image-token mass comes from two key groups under one running max; the rows at
    or above the mean mass rate, and each key's score is their mean probability on it (mean over heads)."""
    block_mask = BlockMask.from_dense(visible)
    groups = kernels.grouped_attention(q, k, v, image_mask.long()[None], scale=scale, block_mask=block_mask,
                                       num_groups=2)
    total = groups.mass.sum(dim=0)
    image_share = torch.where(total > 0, groups.mass[1] / total.clamp_min(1e-30), 0.0)[0].mean(dim=0)  # (R,)
    raters = image_share >= image_share.mean()
    sums = kernels.column_sums(q, k, groups.lse, raters[None], scale=scale, block_mask=block_mask)
    return sums[0].mean(dim=0) / raters.sum()


def max_min_diverse(x: torch.Tensor, budget: int, chunk: int = 1024) -> torch.Tensor:
    """Indices, in pick order, of ``budget`` rows of ``x`` (n, C) chosen greedily for max-min cosine distance.

    The first pick is the row whose nearest other row is farthest; each next pick maximises the distance to
    its nearest picked row (ties: the lowest index). Distances are computed ``chunk`` rows at a time."""
    n = x.shape[0]
    if budget == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=x.device)
    nearest = torch.empty(n, device=x.device)
    for start in range(0, n, chunk):
        similarity = x[start:start + chunk] @ x.T
        similarity[:, start:start + chunk].fill_diagonal_(-float("inf"))
        nearest[start:start + chunk] = 1 - similarity.max(dim=1).values
    picked = [int(nearest.argmax())]
    distance = 1 - x @ x[picked[0]]
    for _ in range(budget - 1):
        distance[picked] = -float("inf")
        picked.append(int(distance.argmax()))
        distance = torch.minimum(distance, 1 - x @ x[picked[-1]])
    return torch.tensor(picked, device=x.device)


def _padding_mask(mask) -> torch.Tensor | None:
    """The 2D (B, N) attention mask the VLM core received (None: no padding)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(_MASK_ERROR.format(kind=type(mask).__name__, shape=tuple(getattr(mask, "shape", ()))))
    return mask


_MASK_ERROR = ("pruning takes a 2D attention_mask (batch, sequence: 1 = token, 0 = padding) or none; got a {kind} of "
               "shape {shape}. Custom 4D masks are not supported: pass the processor's 2D padding mask")
_DYNAMIC = (None, "dynamic")  # cache implementations pruning supports: each layer's cache grows as it is filled


def _refuse_unsupported_generation(method: str, model, kwargs: dict) -> None:
    """Before generate() does any work: refuse what pruning's per-layer caches cannot follow."""
    config = kwargs.get("generation_config") or model.generation_config
    lookup = kwargs.get("prompt_lookup_num_tokens", getattr(config, "prompt_lookup_num_tokens", None))
    if lookup or kwargs.get("assistant_model") is not None or kwargs.get("assistant_early_exit") is not None:
        raise ValueError(f"{method} does not support assisted decoding (prompt_lookup_num_tokens, assistant_model): "
                         "it crops the cache after rejected candidates, and pruned layers cache fewer tokens. "
                         "Generate without it, or remove() the method first")
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    cache = cache_argument(kwargs)
    if implementation not in _DYNAMIC or (cache is not None and type(cache).__name__ != "DynamicCache"):
        used = implementation if implementation not in _DYNAMIC else type(cache).__name__
        raise ValueError(f"{method} supports the default dynamic cache only; got {used!r} (pruned layers cache "
                         "fewer tokens than the others, which a preallocated cache cannot hold)")
    mask = kwargs.get(ATTENTION_MASK)
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
        raise ValueError(f"{method}: " + _MASK_ERROR.format(kind=type(mask).__name__,
                                                            shape=tuple(getattr(mask, "shape", ()))))


def _guard_generate(model, method: str):
    """Wrap ``model.generate`` (signature kept) to refuse unsupported generation settings up front; returns undo."""
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        _refuse_unsupported_generation(method, model, kwargs)
        return original(*args, **kwargs)

    model.generate = generate
    return lambda: delattr(model, "generate")


class _Scorer:
    """Observer op (mmattn.text_attention) in a stage's scoring layer (K - 1): during a pruned prefill, the stage
    chooses from the attention the layer computes."""

    def __init__(self, state: _PruneState, stage: int):
        self.state, self.stage = state, stage

    def observe(self, module, query, key, value, attention_mask, kwargs) -> None:
        if self.state.next_stage == self.stage:
            self.state.select(self.stage, query, key, value, kwargs.get("scaling"), attention_mask)


@register_installer(FastV)
def install_fastv(model, config: FastV):
    """FastV is PyramidDrop's one-stage case; returns undo."""
    return _install(model, config, [(config.layer, config.keep, "last_query")], "FastV")


@register_installer(PyramidDrop)
def install_pyramid_drop(model, config: PyramidDrop):
    scorer = "layer_input" if config.ranking == "layer_input" else "last_query"
    return _install(model, config, [(layer, keep, scorer) for layer, keep in config.stages], "PyramidDrop")


@register_installer(SparseVLM)
def install_sparsevlm(model, config: SparseVLM):
    return _install(model, config, [(config.layer, config.keep, "text")], "SparseVLM")


@register_installer(DivPrune)
def install_divprune(model, config: DivPrune):
    return _install(model, config, [(config.layer, config.keep, "diversity")], "DivPrune")


@register_installer(VisionZip)
def install_visionzip(model, config: VisionZip):
    return _install(model, config, [(0, config.keep, "vision")], "VisionZip")


def _install(model, config, stages: list[tuple[int, float | int, str]], method: str):
    """Validate, switch the text model to the pruning attention and hook the pruned layers; returns undo."""
    name = type(model).__name__
    family = vlm_family(model, method)
    core = model.model
    layers = family.text_layers(model)
    for i, (layer, _, scorer) in enumerate(stages):
        lowest = 0 if scorer in ("diversity", "vision") else 1  # the configs check the lower bound
        if not layer < len(layers):
            where = f"stages[{i}] " if method == "PyramidDrop" else ""
            raise ValueError(f"{where}layer={layer} is out of range for {name}: its language model has {len(layers)} "
                             f"layers; expected {lowest} <= layer <= {len(layers) - 1}")
    if model in _PRUNED:
        raise ValueError(f"{method} cannot be applied to {name}: {_PRUNED[model]} (pruning) is applied already")
    text_attention.check(model, method)
    vision = stages[0][2] == "vision"
    if vision:
        vision_module, mode, to_features = _vision_scoring(model, family)
        if model.config.vision_config._attn_implementation != "sdpa":
            raise ValueError(f"{method} runs on the vision tower's 'sdpa' attention; {name} uses "
                             f"{model.config.vision_config._attn_implementation!r}")

    visual_ids = [model.config.image_token_id]
    if family.video and (not vision or "video" in to_features):  # LLaVA-OneVision, Qwen2-VL
        visual_ids.append(model.config.video_token_id)
    state = _PruneState(config, stages, model, len(layers), visual_ids)
    with installing() as changes:  # each change's undo registered as it is made
        changes.add(text_attention.use(model, method))
        _PRUNED[model], _STATES[model] = method, state
        changes.add(functools.partial(_PRUNED.pop, model))
        changes.add(functools.partial(_STATES.pop, model))
        if vision:
            AttentionInterface.register(VISION_IMPLEMENTATION, _vision_attention)
            AttentionMaskInterface.register(VISION_IMPLEMENTATION, sdpa_mask)
            model.set_attn_implementation({"vision_config": VISION_IMPLEMENTATION})
            changes.add(lambda: model.set_attn_implementation({"vision_config": "sdpa"}))
            _VISION_SCORING[vision_module], state.to_features = (state, mode), to_features
            changes.add(functools.partial(_VISION_SCORING.pop, vision_module))
            for kind in to_features:
                changes.add(state.wrap_features(core, kind))
        for stage, (layer, _, scorer) in enumerate(stages):
            if scorer in ATTENTION_SCORERS:
                module = layers[layer - 1].self_attn
                changes.add(text_attention.add_op(module, _Scorer(state, stage)))
                _SCORING_LAYERS[module] = state
                changes.add(functools.partial(_SCORING_LAYERS.pop, module))
        if config.positions == "compact":
            rotary = getattr(getattr(core, family.text_model), "rotary_emb", None)
            if rotary is None:
                raise ValueError(f"{method}: positions='compact' needs the text model's rotary_emb; {name} has none")
            changes.add(rotary.register_forward_hook(state.record_rotary, with_kwargs=True).remove)
        changes.add(_guard_generate(model, method))
        changes.add(core.register_forward_pre_hook(state.begin, with_kwargs=True).remove)
        changes.add(core.register_forward_hook(state.finish, with_kwargs=True).remove)
        starts = [layer for layer, _, _ in stages]
        for i in range(starts[0], len(layers)):
            stage = max(j for j, start in enumerate(starts) if start <= i)
            hook = state.layer_hook(layers[i], stage, i == starts[stage])
            changes.add(layers[i].register_forward_pre_hook(hook, with_kwargs=True).remove)
    return changes.undo


# VisionZip: scores from the vision tower. The vision sub-config's attention becomes VISION_IMPLEMENTATION (SDPA
# as before); in the tower's scoring layer it also computes, per image, each patch's score: the [CLS] query's
# probabilities (``row_probs``) or, without a [CLS], the attention received (``column_sums`` over the real
# queries, divided by their count), mean over heads. A per-family function then maps patch scores onto the LLM's
# image tokens the way the projector maps patch features (drop [CLS], avg-pool, pixel-shuffle, 2x2 merge, Qwen2.5-VL's
# window order undone).
VISION_IMPLEMENTATION = "mmattn_prune_vision"
_VISION_SCORING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # vision attention -> (_PruneState, mode)


def _vision_attention(module, query, key, value, attention_mask, **kwargs):
    entry = _VISION_SCORING.get(module)
    if entry is not None and entry[0].collecting:
        entry[0].vision_scores[entry[0].collecting].append(
            _patch_scores(query, key, value, kwargs.get("scaling"), attention_mask, entry[1]))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _patch_scores(query, key, value, scale, attention_mask, mode: str) -> torch.Tensor:
    """(B, N) patch scores of one vision attention call, mean over heads."""
    if mode == "cls":
        q = query[:, :, :1]
        _, lse = kernels.attention(q, key, value, scale=scale, return_lse=True)
        return kernels.row_probs(q, key, lse, scale=scale)[:, :, 0].mean(dim=1)
    block_mask = None
    real = torch.ones(query.shape[0], query.shape[2], dtype=torch.bool, device=query.device)
    if attention_mask is not None:
        visible = text_attention.visible(attention_mask)
        block_mask = BlockMask.from_dense(visible)
        real = visible.any(dim=-1)[:, 0].expand_as(real)
    _, lse = kernels.attention(query, key, value, scale=scale, block_mask=block_mask, return_lse=True)
    sums = kernels.column_sums(query, key, lse, real, scale=scale, block_mask=block_mask)
    return sums.mean(dim=1) / real.sum(dim=1, keepdim=True)


def _vision_scoring(model, family) -> tuple[torch.nn.Module, str, dict]:
    """(the vision attention module whose layer yields the features, "cls" or "received", {"image": a function
    mapping the collected per-call patch scores and get_image_features' arguments to one flat score per LLM image
    token in feature order, "video": the same for video tokens where the family maps them}), from the family's
    table entry (mmattn.adapters.VLM_FAMILIES)."""
    name, config, layers = type(model).__name__, model.config, family.vision_layer_list(model)
    index = -1
    if family.feature_layer_from_config:
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or layer == 0 or not -len(layers) <= layer <= len(layers):
            raise ValueError(f"VisionZip needs one vision_feature_layer after the embeddings; {name} uses {layer!r}")
        index = layer if layer < 0 else layer - 1
    attention = getattr(layers[index], family.vision_attention)
    to_features = {"image": _TO_TOKENS[family.to_tokens](model, name)}
    if family.video_to_tokens is not None:
        to_features["video"] = _TO_TOKENS[family.video_to_tokens](model, name)
    return attention, family.vision_scores, to_features


def _drop_cls(model, name):
    drop = model.config.vision_feature_select_strategy == "default"
    return lambda chunks, call: torch.cat(chunks)[:, 1 if drop else 0:].flatten()


def _flat(model, name):
    return lambda chunks, call: torch.cat(chunks).flatten()


def _avg_pool(model, name):
    pool = model.model.multi_modal_projector.kernel_size
    side = model.model.multi_modal_projector.patches_per_image
    return lambda chunks, call: F.avg_pool2d(torch.cat(chunks).view(-1, 1, side, side), pool).flatten()


def _pixel_shuffle(model, name):
    connector = model.model.connector
    return lambda chunks, call: connector.pixel_shuffle(torch.cat(chunks)[..., None],
                                                        connector.scale_factor).sum(dim=-1).flatten()


def _merge(model, name):
    group = model.config.vision_config.spatial_merge_size ** 2
    return lambda chunks, call: torch.cat([c.view(-1, group).sum(dim=1) for c in chunks])


def _merge_unwindowed(model, name):
    visual = model.model.visual
    if len(visual.blocks) - 1 not in visual.fullatt_block_indexes:
        raise ValueError(f"VisionZip needs the last vision block of {name} to attend over whole images; "
                         f"fullatt_block_indexes={visual.fullatt_block_indexes} misses block {len(visual.blocks) - 1}")
    merged = _merge(model, name)

    def unwindowed(chunks, call):  # the tower runs its patches in window order; the merger output is re-sorted
        grid = call["image_grid_thw"] if "image_grid_thw" in call else call["video_grid_thw"]
        window_index, _ = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                  visual.patch_size)
        scores = merged(chunks, call)
        return scores[torch.argsort(window_index.to(scores.device))]

    return unwindowed


def _anyres(model, name):
    """LLaVA-OneVision's images: per image, the base tile's patches, then the high-resolution tiles arranged,
    unpadded (and shrunk, above anyres_max) with one row-newline token per row, as the model packs its features;
    the newline tokens carry no patch and score -inf (the official VisionZip drops them, on LLaVA-NeXT)."""
    core, config = model.model, model.config
    start = 1 if config.vision_feature_select_strategy == "default" else 0

    def to_tokens(chunks, call):
        scores = torch.cat(chunks)[:, start:, None]
        tiles = anyres_tile_counts(config, call["image_sizes"], call.get("batch_num_images"))
        packed, _ = core.pack_image_features(list(torch.split(scores, tiles)), call["image_sizes"],
                                             image_newline=scores.new_full((1,), -float("inf")),
                                             vision_aspect_ratio=call.get("vision_aspect_ratio")
                                             or config.vision_aspect_ratio)
        return torch.cat(packed).flatten()

    return to_tokens


def _pooled_frames(model, name):
    """LLaVA-OneVision's videos: each frame's patch scores pooled as its features are (bilinear, half size), the
    frames in order, then one newline token per video (-inf)."""
    core = model.model
    start = 1 if model.config.vision_feature_select_strategy == "default" else 0

    def to_tokens(chunks, call):
        pooled = core.apply_pooling(torch.cat(chunks)[:, start:, None])
        pooled = pooled.reshape(call["pixel_values_videos"].shape[0], -1)
        return F.pad(pooled, (0, 1), value=-float("inf")).flatten()

    return to_tokens


_TO_TOKENS = {"drop_cls": _drop_cls, "flat": _flat, "avg_pool": _avg_pool, "pixel_shuffle": _pixel_shuffle,
              "merge": _merge, "merge_unwindowed": _merge_unwindowed, "anyres": _anyres,
              "pooled_frames": _pooled_frames}
VISIONZIP_SUPPORTED = supported_vlms(encoder_side=True)
