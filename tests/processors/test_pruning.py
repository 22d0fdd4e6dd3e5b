"""Visual token pruning on tiny VLMs, on CPU: FastV (arXiv 2403.06764), SparseVLM-style text raters (arXiv
2410.04417), DivPrune (arXiv 2503.02175) and PyramidDrop (arXiv 2410.17247), on LLaVA (Llama), LLaVA-OneVision
(Qwen2, AnyRes with newline tokens), Qwen2-VL and Qwen2.5-VL (M-RoPE), Gemma 3 (sliding and full layers, each
with its own mask and cache kind), PaliGemma (prefix-LM) and SmolVLM / Idefics3 (split image spans)."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AttentionInterface

import mmattn
from mmattn import DivPrune, FastV, PyramidDrop, SparseVLM, VisionZip, methods
from mmattn.processors import pruning
from mmattn.testing import TinyVLM, build_tiny
from mmattn.testing.media import random_video

# tiny/gemma3 has layers (sliding, sliding, full); GEMMA3_FULL_MIDDLE reorders them (sliding, full, sliding).
GEMMA3_FULL_MIDDLE = "tiny/gemma3:full-middle"
NAMES = ["tiny/llava", "tiny/llava-onevision", "tiny/qwen2-vl", "tiny/qwen2.5-vl", "tiny/gemma3", GEMMA3_FULL_MIDDLE,
         "tiny/paligemma", "tiny/smolvlm", "tiny/idefics3"]
MAX_NEW_TOKENS = 4


def build(name: str) -> TinyVLM:
    if name != GEMMA3_FULL_MIDDLE:
        return build_tiny(name)
    vlm = build_tiny("tiny/gemma3")
    config = copy.deepcopy(vlm.model.config)
    config.text_config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = type(vlm.model)(config)
    model.load_state_dict(vlm.model.state_dict())
    model.generation_config = copy.deepcopy(vlm.model.generation_config)
    return TinyVLM(model.eval(), vlm.processor)


def scoring_layer(model) -> int:
    """FastV(layer=...) in these tests: the last layer (the tiny text models have 2 or 3 layers)."""
    return model.config.text_config.num_hidden_layers - 1


# Each method as the shared tests apply it: the attention scorers prune the last layer, DivPrune before the LLM.
METHODS = {
    "fastv": lambda model, keep, **kw: FastV(layer=scoring_layer(model), keep=keep, **kw),
    "sparsevlm": lambda model, keep, **kw: SparseVLM(layer=scoring_layer(model), keep=keep, **kw),
    "divprune": lambda model, keep, **kw: DivPrune(keep=keep, **kw),
    "visionzip": lambda model, keep, **kw: VisionZip(keep=keep, **kw),
}


@pytest.fixture(params=list(METHODS))
def method(request, vlm):
    if request.param == "visionzip" and type(vlm.model).__name__ not in pruning.VISIONZIP_SUPPORTED:
        pytest.skip(f"VisionZip does not support {type(vlm.model).__name__} (tested to refuse it)")
    return METHODS[request.param]


SHORT, LONG = "What is this?", "Describe every object in this picture, in detail."


def make_image(seed: int, height: int = 48, width: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(vlm: TinyVLM, questions: list[str], images: list) -> dict:
    """One image and one question per sample: the chat template, or PaliGemma's task prompt."""
    architecture = type(vlm.model).__name__
    if architecture == "PaliGemmaForConditionalGeneration":
        prompts = [f"<image>answer en {q}" for q in questions]
    else:
        chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
        prompts = [vlm.processor.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    if architecture.startswith(("Gemma3", "SmolVLM", "Idefics3")):
        images = [[image] for image in images]
    inputs = dict(vlm.processor(text=prompts, images=images, padding=True, return_tensors="pt"))
    inputs.pop("labels", None)  # PaliGemmaProcessor's; the logits of a pruned prefill are shorter
    return inputs


def hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module", params=NAMES)
def vlm(request) -> TinyVLM:
    return build(request.param)


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@torch.no_grad()
def generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **kwargs)


@torch.no_grad()
def eager_attentions(model, inputs) -> tuple[torch.Tensor, ...]:
    """Every decoder layer's attention matrix (B, H, N, N) from the unmodified model run eagerly."""
    model.set_attn_implementation({"text_config": "eager"})
    try:
        return model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


def visual_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The prunable tokens: image tokens, and video tokens where the model has them."""
    ids = [model.config.image_token_id, getattr(model.config, "video_token_id", None)]
    return torch.isin(input_ids, torch.tensor([i for i in ids if i is not None]))


def eager_image_scores(model, inputs, layer: int | None = None) -> torch.Tensor:
    """Reference: eager attention of the last query in the scoring layer, mean over heads, at the image tokens."""
    last_row = eager_attentions(model, inputs)[(layer or scoring_layer(model)) - 1][:, :, -1].mean(dim=1)
    image_mask = visual_mask(model, inputs["input_ids"])
    return last_row[image_mask].view(last_row.shape[0], -1)


def greedy(model, step_logits: torch.Tensor) -> torch.Tensor:
    """generate()'s greedy pick (B, 1): the argmax over tokens its config does not suppress (SmolVLM: <image>)."""
    step_logits = step_logits.clone()
    step_logits[:, model.generation_config.suppress_tokens or []] = -float("inf")
    return step_logits.argmax(dim=-1, keepdim=True)


def assert_uncached_loop_matches(model, inputs, out) -> None:
    """Each decode step of ``out`` (a generate() with logits) equals a forward without cache over the prompt and
    the tokens generated so far, and picks the same token."""
    prompt_len, step_inputs = inputs["input_ids"].shape[1], dict(inputs)
    for step in range(out.sequences.shape[1] - prompt_len):
        step_logits = logits(model, {**step_inputs, "use_cache": False})[:, -1]
        torch.testing.assert_close(step_logits, out.logits[step], atol=1e-5, rtol=1e-5)
        next_id = greedy(model, step_logits)
        assert torch.equal(next_id[:, 0], out.sequences[:, prompt_len + step])
        step_inputs["input_ids"] = torch.cat([step_inputs["input_ids"], next_id], dim=1)
        step_inputs["attention_mask"] = torch.cat([step_inputs["attention_mask"], torch.ones_like(next_id)], dim=1)
        for key in ("mm_token_type_ids", "token_type_ids"):  # generate() marks new tokens as PaliGemma's suffix
            if key in step_inputs:
                suffix = type(model).__name__ == "PaliGemmaForConditionalGeneration" and key == "token_type_ids"
                step_inputs[key] = torch.cat([step_inputs[key], torch.full_like(next_id, int(suffix))], dim=1)


def assert_row_generates_alone(model, batch, batch_out, i, single, single_out):
    """Row i of a batched generate() equals its single run: ids (a sample that stops early is padded
    in the batch) and the logits of every decode step."""
    new_ids = single_out.sequences[0, single["input_ids"].shape[1]:]
    batch_ids = batch_out.sequences[i, batch["input_ids"].shape[1]:]
    assert torch.equal(new_ids, batch_ids[:len(new_ids)])
    assert (batch_ids[len(new_ids):] == model.generation_config.pad_token_id).all()
    for step_batch, step_single in zip(batch_out.logits, single_out.logits):
        torch.testing.assert_close(step_single[0], step_batch[i], atol=1e-5, rtol=1e-5)

def eager_rater_scores(model, inputs, layer: int) -> torch.Tensor:
    """Reference for SparseVLM-style raters, from the eager attention matrix of layer ``layer - 1`` (mean over
    heads): candidate rows are real text tokens after the first image token; rows whose image mass is at least
    the candidates' mean rate; each image token's score is the raters' mean attention on it."""
    attentions = eager_attentions(model, inputs)[layer - 1].mean(dim=1)  # (B, N, N)
    image_mask = visual_mask(model, inputs["input_ids"])
    real = inputs["attention_mask"].bool()
    scores = []
    for b in range(len(attentions)):
        first_image = int(image_mask[b].nonzero()[0])
        rows = [i for i in range(first_image + 1, image_mask.shape[1]) if real[b, i] and not image_mask[b, i]]
        share = torch.stack([attentions[b, i][image_mask[b]].sum() for i in rows])
        raters = [i for i, s in zip(rows, share) if s >= share.mean()]
        scores.append(torch.stack([attentions[b, i][image_mask[b]] for i in raters]).mean(dim=0))
    return torch.stack(scores)


def vision_feature_attention(model):
    """The vision tower's attention module whose layer gives the image features, and whether a [CLS] ranks."""
    core, name = model.model, type(model).__name__
    if name == "LlavaForConditionalGeneration":  # hidden_states[i] is the output of encoder.layers[i - 1]
        return core.vision_tower.encoder.layers[model.config.vision_feature_layer].self_attn, True
    if name in ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"):
        return core.visual.blocks[-1].attn, False
    tower = getattr(core, "vision_tower", None) or core.vision_model
    return tower.encoder.layers[-1].self_attn, False


def window_order(model, grid_thw: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's window order of merge groups, written out: per image, windows of window_size // patch_size //
    merge merge-groups per side, row-major over windows, row-major inside each (edge windows are smaller)."""
    visual = model.model.visual
    side = visual.window_size // visual.spatial_merge_size // visual.patch_size
    order, offset = [], 0
    for t, h, w in grid_thw.tolist():
        h, w = h // visual.spatial_merge_size, w // visual.spatial_merge_size
        for frame in range(t):
            for wy in range(0, h, side):
                for wx in range(0, w, side):
                    order += [offset + frame * h * w + y * w + x for y in range(wy, min(wy + side, h))
                              for x in range(wx, min(wx + side, w))]
        offset += t * h * w
    return torch.tensor(order)


@torch.no_grad()
def eager_vision_scores(model, inputs) -> torch.Tensor:
    """Reference for VisionZip: the eager attention matrices of the tower's feature layer (one per image, or per
    Qwen2-VL chunk), ranked by [CLS] row or by attention received (mean over queries), mean over heads, then
    mapped onto the LLM's image tokens: LLaVA drops the [CLS], Gemma 3 averages k x k patches, SmolVLM /
    Idefics3 pixel-shuffle, Qwen2-VL sums each 2 x 2 merge group."""
    from transformers.models.clip.modeling_clip import eager_attention_forward

    target, cls = vision_feature_attention(model)
    matrices = []

    def capture(module, query, key, value, attention_mask, **kwargs):
        out, weights = eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if module is target:
            matrices.append(weights.mean(dim=1))
        return out, weights

    AttentionInterface.register("test_capture_eager", capture)
    model.set_attn_implementation({"vision_config": "test_capture_eager"})
    try:
        model(**inputs)
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    name, core = type(model).__name__, model.model
    if name.startswith("Qwen2"):  # one matrix per image; 2 x 2 merge groups are consecutive patches
        patch = torch.cat([m[0].mean(dim=0).view(-1, 4).sum(dim=1) for m in matrices])
        if name == "Qwen2_5_VLForConditionalGeneration":  # its tower runs merge groups in window order
            grid = inputs["image_grid_thw"] if "image_grid_thw" in inputs else inputs["video_grid_thw"]
            patch = patch[window_order(model, grid).argsort()]
    else:
        patch = torch.cat([m[:, 0, 1:] if cls else m.mean(dim=1) for m in matrices])
    if name == "Gemma3ForConditionalGeneration":
        side, tokens = core.multi_modal_projector.patches_per_image, core.multi_modal_projector.tokens_per_side
        k = side // tokens
        patch = patch.view(-1, tokens, k, tokens, k).mean(dim=(2, 4))
    if name in ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration"):
        patch = core.connector.pixel_shuffle(patch[..., None], core.connector.scale_factor).sum(dim=-1)
    if name == "LlavaOnevisionForConditionalGeneration":
        patch = onevision_token_scores(model, inputs, patch)
    mask = visual_mask(model, inputs["input_ids"])
    return patch.flatten().view(len(mask), -1)


@torch.no_grad()
def onevision_token_scores(model, inputs, patch: torch.Tensor) -> torch.Tensor:
    """LLaVA-OneVision's token scores from per-tile patch scores (tiles, N), found without its packing code: the
    projector maps each patch on its own, so each image token's embedding is the projected feature of exactly one
    patch (matched here), or the row newline (-inf). Videos: frames pooled bilinearly to half size, a newline."""
    core = model.model
    if "pixel_values_videos" in inputs:
        side = int(patch.shape[1] ** 0.5)
        pooled = F.interpolate(patch.view(-1, 1, side, side), size=(math.ceil(side / 2),) * 2, mode="bilinear")
        return torch.cat([pooled.flatten(), torch.tensor([-float("inf")])])
    projected = []
    hook = core.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.append(out))
    try:
        embeddings = decoder_input(model, inputs, 0)[inputs["input_ids"] == model.config.image_token_id]
    finally:
        hook.remove()
    candidates = torch.cat([projected[0].flatten(0, 1), core.image_newline[None]])
    nearest = torch.cdist(embeddings.double(), candidates.double()).argmin(dim=1)
    return torch.cat([patch.flatten(), torch.tensor([-float("inf")])])[nearest]


def reference_max_min(x: torch.Tensor, budget: int) -> list[int]:
    """DivPrune's greedy max-min selection over the full cosine-distance matrix, one pick at a time."""
    x = torch.nn.functional.normalize(x.double(), dim=-1)
    distance = 1 - x @ x.T
    n = len(x)
    nearest = [min(distance[i, j] for j in range(n) if j != i) for i in range(n)]
    picked = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(picked) < budget:
        rest = [i for i in range(n) if i not in picked]
        picked.append(max(rest, key=lambda i: (min(distance[i, p] for p in picked), -i)))
    return picked


@torch.no_grad()
def decoder_input(model, inputs, layer: int) -> torch.Tensor:
    """Hidden states entering decoder layer ``layer`` of the unmodified model."""
    text_model = getattr(model.model, "text_model", None) or model.model.language_model
    captured = {}
    hook = text_model.layers[layer].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    try:
        model(**inputs)
    finally:
        hook.remove()
    return captured["x"]


def reference_choice(model, inputs, config, budget: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(scores or None, kept image positions (B, budget)) of an implementation written here, independent of the
    engine: eager attention for FastV and SparseVLM, a plain greedy over the distance matrix for DivPrune."""
    image_mask = visual_mask(model, inputs["input_ids"])  # VisionZip: images only (no video in its tests)
    positions = image_mask.nonzero()[:, 1].view(len(image_mask), -1)
    if isinstance(config, VisionZip):
        scores = eager_vision_scores(model, inputs)
        return scores, positions.gather(1, scores.topk(budget, dim=1).indices).sort(dim=1).values
    if isinstance(config, DivPrune):
        hidden = decoder_input(model, inputs, config.layer)
        picks = [reference_max_min(hidden[b, image_mask[b]], budget) for b in range(len(hidden))]
        return None, torch.stack([positions[b, p].sort().values for b, p in enumerate(picks)])
    scores = (eager_image_scores(model, inputs, config.layer) if isinstance(config, FastV)
              else eager_rater_scores(model, inputs, config.layer))
    return scores, positions.gather(1, scores.topk(budget, dim=1).indices).sort(dim=1).values


def test_config_validation():
    default = {"positions": "original", "paper_exact": False}
    assert FastV(layer=2, keep=0.25).to_dict() == {"method": "fastv", "layer": 2, "keep": 0.25, **default}
    assert SparseVLM(layer=3, keep=64).to_dict() == {"method": "sparsevlm", "layer": 3, "keep": 64, **default}
    assert DivPrune(keep=0.1).to_dict() == {"method": "divprune", "keep": 0.1, "layer": 0, **default}
    for config in (FastV, SparseVLM, DivPrune):
        lowest = 0 if config is DivPrune else 1
        with pytest.raises(ValueError, match=f"layer={lowest - 1} is out of range: expected an int >= {lowest}"):
            config(layer=lowest - 1)
        for bad in (dict(layer=1.0), dict(keep=1.5), dict(keep=-1), dict(keep=True), dict(keep="all")):
            with pytest.raises(ValueError, match=rf"^{next(iter(bad))}={bad[next(iter(bad))]!r}"):
                config(**bad)


def test_positions_and_paper_exact():
    """paper_exact=True sets each option as the official code does and refuses one given otherwise."""
    assert PyramidDrop(paper_exact=True).positions == "compact"
    assert VisionZip(paper_exact=True).positions == DivPrune(paper_exact=True).positions == "compact"
    assert SparseVLM(paper_exact=True).positions == "compact"
    assert FastV(paper_exact=True).positions == FastV().positions == "original"  # FastV's code keeps them
    assert methods.from_dict(PyramidDrop(paper_exact=True).to_dict()) == PyramidDrop(paper_exact=True)
    with pytest.raises(ValueError, match="ranking='previous_attention' contradicts paper_exact=True: the official "
                                         "PyramidDrop code uses ranking='layer_input'"):
        PyramidDrop(ranking="previous_attention", paper_exact=True)
    with pytest.raises(ValueError, match="positions='original' contradicts paper_exact=True"):
        DivPrune(positions="original", paper_exact=True)
    with pytest.raises(ValueError, match="merge='mean' contradicts"):
        VisionZip(merge="mean", paper_exact=True)
    with pytest.raises(ValueError, match="positions='shifted': expected 'original' or 'compact'"):
        FastV(positions="shifted")
    with pytest.raises(TypeError, match="paper_exact=1: expected True or False"):
        FastV(paper_exact=1)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_keep_all_equals_unmodified(vlm, method, positions):
    inputs = encode(vlm, [SHORT], [make_image(1)])
    reference = logits(vlm.model, inputs)
    with mmattn.apply(vlm.model, method(vlm.model, 1.0, positions=positions)):
        full = logits(vlm.model, inputs)
        stats = pruning.last_stats(vlm.model)
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
    assert stats.tokens_per_layer == [inputs["input_ids"].shape[1]] * vlm.model.config.text_config.num_hidden_layers
    assert stats.prefill_seconds > 0 and stats.decode_steps == 0


def test_choice_matches_reference(vlm, method):
    inputs = encode(vlm, [SHORT], [make_image(1)])
    config = method(vlm.model, 0.25)
    image_mask = inputs["input_ids"][0] == vlm.model.config.image_token_id
    n_image, budget = int(image_mask.sum()), round(0.25 * int(image_mask.sum()))
    reference_scores, expected = reference_choice(vlm.model, inputs, config, budget)
    with mmattn.apply(vlm.model, config):
        pruned = logits(vlm.model, inputs)
    stats = pruning.last_stats(vlm.model)
    if reference_scores is not None:
        torch.testing.assert_close(stats.image_scores, reference_scores, atol=1e-6, rtol=1e-5)
    assert torch.equal(stats.kept_image_positions, expected)

    # Layers from config.layer on saw every text token and only the kept image tokens; the logits are the kept
    # tokens'.
    n, layers = inputs["input_ids"].shape[1], vlm.model.config.text_config.num_hidden_layers
    assert stats.tokens_per_layer == [n] * config.layer + [n - n_image + budget] * (layers - config.layer)
    assert stats.equivalent_tokens == sum(stats.tokens_per_layer) / layers
    assert pruned.shape[1] == n - n_image + budget
    # (the last token of a sliding-window last layer may see no image token: compare every kept token)
    kept = torch.cat([(~image_mask).nonzero().squeeze(1), stats.kept_image_positions[0]]).sort().values
    assert not torch.allclose(pruned[0], logits(vlm.model, inputs)[0, kept])


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_padded_batch_equals_single_samples(vlm, method, positions):
    images = [make_image(1), make_image(2)]
    batch = encode(vlm, [SHORT, LONG], images)
    assert not batch["attention_mask"][0].all()  # left padding
    with mmattn.apply(vlm.model, method(vlm.model, 0.25, positions=positions)):
        batch_logits = logits(vlm.model, batch)[:, -1]
        batch_out = generate(vlm.model, batch, return_dict_in_generate=True, output_logits=True)
        for i, (conversation, image) in enumerate(zip([SHORT, LONG], images)):
            single = encode(vlm, [conversation], [image])
            torch.testing.assert_close(logits(vlm.model, single)[0, -1], batch_logits[i], atol=1e-5, rtol=1e-5)
            single_out = generate(vlm.model, single, return_dict_in_generate=True, output_logits=True)
            assert_row_generates_alone(vlm.model, batch, batch_out, i, single, single_out)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_cached_generate_equals_uncached_loop(vlm, method, monkeypatch, positions):
    """Decode steps over the pruned cache equal full forwards without cache that keep the same image tokens (with
    compact positions, decode positions move down by the tokens dropped)."""
    model = vlm.model
    inputs = encode(vlm, [LONG], [make_image(3)])
    prompt_len = inputs["input_ids"].shape[1]
    config = method(model, 0.25, positions=positions)
    layer = config.layer
    with mmattn.apply(model, config):
        out = generate(model, inputs, return_dict_in_generate=True, output_logits=True)
        stats = pruning.last_stats(model)
        kept = prompt_len - stats.image_positions.shape[1] + stats.kept_image_positions.shape[1]
        steps = out.sequences.shape[1] - prompt_len
        assert stats.decode_steps == steps - 1 and stats.decode_seconds > 0
        cache = out.past_key_values
        text_model = getattr(model.model, "text_model", None) or model.model.language_model
        window = getattr(text_model.layers[layer].self_attn, "sliding_window", None)
        full_len, kept_len = prompt_len + steps - 1, kept + steps - 1
        if window is not None:  # a sliding-window cache keeps the last window - 1 tokens
            full_len, kept_len = min(full_len, window - 1), min(kept_len, window - 1)
        assert cache.layers[layer].keys.shape[2] == kept_len
        if window is None and layer > 0:
            assert cache.layers[0].keys.shape[2] > kept_len or model.config.text_config.layer_types[0] != "full_attention"

        # Without a cache every forward is a prefill; pin its choice to the one generate() made.
        monkeypatch.setattr(pruning, "top_image_tokens", lambda scores, positions, budget: stats.kept_image_positions)
        assert_uncached_loop_matches(model, inputs, out)


def test_remove_restores_bit_identical(vlm, method):
    model = vlm.model
    inputs = encode(vlm, [SHORT], [make_image(4)])
    before, hooks = logits(model, inputs), hook_count(model)
    config = method(model, 0.5)
    handle = mmattn.apply(model, config)
    assert model.config.text_config._attn_implementation == pruning.IMPLEMENTATION
    assert model.config.vision_config._attn_implementation == \
        (pruning.VISION_IMPLEMENTATION if isinstance(config, VisionZip) else "sdpa")
    assert hook_count(model) > hooks
    with pytest.raises(ValueError, match="applied already"):
        mmattn.apply(model, method(model, 0.5))
    logits(model, inputs)
    generate(model, inputs)
    handle.remove()
    assert model.config.text_config._attn_implementation == model.config.vision_config._attn_implementation == "sdpa"
    assert hook_count(model) == hooks and "get_image_features" not in vars(model.model)
    assert torch.equal(logits(model, inputs), before)


def test_rejects_unsupported_model_unchanged():
    from transformers import LlamaConfig, LlamaForCausalLM  # every tiny VLM is supported: a text-only model is not

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    hooks = hook_count(model)
    with pytest.raises(ValueError, match="FastV does not support LlamaForCausalLM; supported models: "
                                         "LlavaForConditionalGeneration, .*SmolVLMForConditionalGeneration"):
        mmattn.apply(model, FastV(layer=1))
    assert model.config._attn_implementation == "sdpa"
    assert hook_count(model) == hooks


def encode_multi(vlm: TinyVLM, questions: list[str], images: list[list]) -> dict:
    """Several images per sample (``images[b]``), each sample one user turn."""
    chats = [[{"role": "user", "content": [{"type": "image"}] * len(ims) + [{"type": "text", "text": q}]}]
             for q, ims in zip(questions, images)]
    prompts = [vlm.processor.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    return dict(vlm.processor(text=prompts, images=[im for ims in images for im in ims], padding=True,
                              return_tensors="pt"))


UNEQUAL = {  # (images of sample 0, images of sample 1): their image-token counts differ
    "sizes": ([make_image(1)], [make_image(2, height=96, width=96)]),
    "one and two images": ([make_image(1), make_image(3, height=64, width=48)], [make_image(2)]),
}


@pytest.mark.parametrize("images", list(UNEQUAL))
@pytest.mark.parametrize("name", ["tiny/qwen2-vl", "tiny/llava-onevision", "tiny/qwen2.5-vl"])
@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method_name", list(METHODS) + ["pyramiddrop"])
def test_unequal_image_counts_equal_single_samples(name, method_name, images, positions):
    """Samples with different numbers of image tokens each keep their own share (the shorter padded inside with
    hidden fillers): logits and generate() with the cache equal each sample run alone."""
    deep = method_name == "pyramiddrop"  # two stages need the 4-layer variant
    key = name + (":deep" if deep else "")
    if key not in _UNEQUAL_VLMS:
        _UNEQUAL_VLMS[key] = build_deep(key) if deep else build_tiny(name)
    vlm = _UNEQUAL_VLMS[key]
    model = vlm.model
    layers = model.config.text_config.num_hidden_layers
    config = (PyramidDrop(stages=((1, 0.5), (layers - 1, 0.25)), positions=positions) if method_name == "pyramiddrop"
              else METHODS[method_name](model, 0.25, positions=positions))
    questions, rows = [SHORT, LONG], UNEQUAL[images]
    batch = encode_multi(vlm, questions, list(rows))
    counts = visual_mask(model, batch["input_ids"]).sum(1)
    assert counts[0] != counts[1], counts
    with mmattn.apply(model, config):
        batch_logits = logits(model, batch)[:, -1]
        kept = pruning.last_stats(model).kept_image_positions
        batch_out = generate(model, batch, return_dict_in_generate=True, output_logits=True)
        for i in range(2):
            single = encode_multi(vlm, [questions[i]], [rows[i]])
            torch.testing.assert_close(logits(model, single)[0, -1], batch_logits[i], atol=1e-5, rtol=1e-5)
            alone = pruning.last_stats(model).kept_image_positions[0]
            assert (kept[i] >= 0).sum() == len(alone)  # its own budget
            single_out = generate(model, single, return_dict_in_generate=True, output_logits=True)
            assert_row_generates_alone(model, batch, batch_out, i, single, single_out)


_UNEQUAL_VLMS: dict = {}


def test_rejects_layer_out_of_range(vlm):
    hooks, n_layers = hook_count(vlm.model), vlm.model.config.text_config.num_hidden_layers
    with pytest.raises(ValueError, match=f"layer={n_layers} is out of range"):
        mmattn.apply(vlm.model, FastV(layer=n_layers))
    assert vlm.model.config.text_config._attn_implementation == "sdpa"
    assert hook_count(vlm.model) == hooks


def test_llava_onevision_scores_newline_tokens():
    """LLaVA-OneVision writes its AnyRes grid with an image_newline feature closing each row; those rows sit at
    <image> positions too, so FastV scores and may drop them like any other image token."""
    vlm = build_tiny("tiny/llava-onevision")
    inputs = encode(vlm, [SHORT], [make_image(1)])
    captured = {}

    def capture(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"]

    hook = vlm.model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with mmattn.apply(vlm.model, FastV(layer=1, keep=0.25)):
            logits(vlm.model, inputs)
    finally:
        hook.remove()
    newline = vlm.model.model.image_newline.detach()
    newline_positions = (captured["embeds"][0] == newline).all(dim=-1).nonzero().squeeze(1)
    image_positions = pruning.last_stats(vlm.model).image_positions[0]
    assert len(newline_positions) > 0
    assert set(newline_positions.tolist()) <= set(image_positions.tolist())


@pytest.mark.parametrize("name", ["tiny/smolvlm", "tiny/idefics3"])
def test_split_image_spans(name):
    """SmolVLM / Idefics3 interleave their tiles' <image> runs with <fake_token_around_image> and <row_i_col_j>
    tags: every <image> token of every tile competes for the budget, every tag and text token is kept."""
    vlm = build_tiny(name)
    inputs = encode(vlm, [SHORT], [make_image(1)])
    ids = inputs["input_ids"][0]
    image_positions = (ids == vlm.model.config.image_token_id).nonzero().squeeze(1)
    assert (image_positions.diff() > 1).sum() >= 2  # several separate spans
    with mmattn.apply(vlm.model, FastV(layer=1, keep=0.25)):
        pruned = logits(vlm.model, inputs)
    stats = pruning.last_stats(vlm.model)
    assert torch.equal(stats.image_positions[0], image_positions)
    chosen = stats.kept_image_positions[0]
    assert len(chosen) == round(0.25 * len(image_positions)) and set(chosen.tolist()) <= set(image_positions.tolist())
    assert pruned.shape[1] == len(ids) - len(image_positions) + len(chosen)


# PyramidDrop (arXiv 2410.17247): FastV's step repeated at several stage layers. Most tiny text models have 2
# layers (room for one stage only); the ":deep" variants have 4 (the tiny model's weights, 2 new seeded layers).
DEEP_NAMES = ["tiny/llava:deep", "tiny/qwen2-vl:deep", "tiny/gemma3", "tiny/gemma3:deep", "tiny/paligemma:deep",
              "tiny/smolvlm:deep"]


def build_deep(name: str, num_layers: int = 4) -> TinyVLM:
    if not name.endswith(":deep"):
        return build(name)
    vlm = build_tiny(name.removesuffix(":deep"))
    config = copy.deepcopy(vlm.model.config)
    text_config = config.text_config
    old = text_config.num_hidden_layers
    text_config.num_hidden_layers = num_layers
    if getattr(text_config, "layer_types", None) is not None:  # repeat the pattern (Gemma 3: sliding, sliding, full)
        text_config.layer_types = [text_config.layer_types[i % old] for i in range(num_layers)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = type(vlm.model)(config)
    missing, unexpected = model.load_state_dict(vlm.model.state_dict(), strict=False)
    assert not unexpected and missing and all(".layers." in key for key in missing)
    model.generation_config = copy.deepcopy(vlm.model.generation_config)
    return TinyVLM(model.eval(), vlm.processor)


@pytest.fixture(scope="module", params=DEEP_NAMES)
def deep(request) -> TinyVLM:
    return build_deep(request.param)


def pyramid(model, keeps=None) -> PyramidDrop:
    """A stage at every layer 1 .. num_layers - 1, keeping 0.75, 0.5, 0.25 ... of the image tokens by default."""
    n = model.config.text_config.num_hidden_layers
    keeps = keeps or [round(1 - i / n, 4) for i in range(1, n)]
    return PyramidDrop(stages=[(layer, keep) for layer, keep in zip(range(1, n), keeps)])


def test_pyramid_config_validation():
    config = PyramidDrop(stages=[(1, 0.5), (3, 0.25), [5, 2]])
    assert config.stages == ((1, 0.5), (3, 0.25), (5, 2))
    assert config.to_dict() == {"method": "pyramiddrop", "stages": [[1, 0.5], [3, 0.25], [5, 2]],
                                "ranking": "layer_input", "positions": "original", "paper_exact": False}
    assert PyramidDrop(stages=[(2, 8), (3, 0.1)]).stages == ((2, 8), (3, 0.1))  # mixed kinds: no order to check
    bad = [
        ([], r"stages=\[\]: expected a non-empty list"),
        ("1,0.5", "stages='1,0.5'"),
        ([(1, 0.5, 2)], r"stages\[0\]=\(1, 0.5, 2\): expected a \(layer, keep\) pair"),
        ([1], r"stages\[0\]=1: expected"),
        ([(0, 0.5)], r"stages\[0\] layer=0 is out of range: expected an int >= 1"),
        ([(1.0, 0.5)], r"stages\[0\] layer=1.0 is out of range"),
        ([(True, 0.5)], r"stages\[0\] layer=True"),
        ([(1, 1.5)], r"stages\[0\] keep=1.5 is out of range: expected a number in \[0.0, 1.0\]"),
        ([(1, -1)], r"stages\[0\] keep=-1 is out of range: expected a count >= 0"),
        ([(1, True)], r"stages\[0\] keep=True: expected a fraction"),
        ([(1, "all")], r"stages\[0\] keep='all'"),
        ([(2, 0.5), (2, 0.25)], r"stages\[1\] layer=2 is out of range: expected layers strictly increasing"),
        ([(2, 0.5), (1, 0.25)], r"stages\[1\] layer=1 is out of range"),
        ([(1, 0.25), (2, 0.5)], r"stages\[1\] keep=0.5 is out of range: expected keeps non-increasing"),
        ([(1, 4), (2, 8)], r"stages\[1\] keep=8 is out of range"),
    ]
    for stages, message in bad:
        with pytest.raises(ValueError, match=message):
            PyramidDrop(stages=stages)


def test_pyramid_rejects_stage_out_of_range(deep):
    model = deep.model
    hooks, n_layers = hook_count(model), model.config.text_config.num_hidden_layers
    with pytest.raises(ValueError, match=rf"stages\[1\] layer={n_layers} is out of range for .*"
                                         rf"expected 1 <= layer <= {n_layers - 1}"):
        mmattn.apply(model, PyramidDrop(stages=[(1, 0.5), (n_layers, 0.25)]))
    assert model.config.text_config._attn_implementation == "sdpa"
    assert hook_count(model) == hooks


def test_pyramid_equal_keeps_equal_fastv(deep):
    """A second stage keeping as many as the first drops nothing more: with the fused FastV scorer
    (ranking="previous_attention") the run is FastV's."""
    model = deep.model
    inputs = encode(deep, [LONG], [make_image(1)])
    last = model.config.text_config.num_hidden_layers - 1
    with mmattn.apply(model, FastV(layer=1, keep=0.5)):
        fastv = logits(model, inputs)
        fastv_stats = pruning.last_stats(model)
    with mmattn.apply(model, PyramidDrop(stages=[(1, 0.5), (last, 0.5)], ranking="previous_attention")):
        pyramid_logits = logits(model, inputs)
        stats = pruning.last_stats(model)
    torch.testing.assert_close(pyramid_logits, fastv, atol=1e-6, rtol=1e-6)
    assert stats.tokens_per_layer == fastv_stats.tokens_per_layer
    assert torch.equal(stats.kept_image_positions, fastv_stats.kept_image_positions)
    assert [s.layer for s in stats.stages] == [1, last]
    assert torch.equal(stats.stages[1].image_positions, stats.stages[0].kept_image_positions)
    assert torch.equal(stats.stages[1].kept_image_positions, stats.stages[0].kept_image_positions)


def test_pyramid_stage_choices(deep):
    """Stage 1 scores equal eager attention; each later stage keeps the top-k of its own scores over the
    previous stage's survivors (k from the ORIGINAL image-token count), and the sequence shrinks stage by stage."""
    model = deep.model
    inputs = encode(deep, [SHORT], [make_image(1)])
    config = PyramidDrop(stages=pyramid(model).stages, ranking="previous_attention")  # the fused FastV scorer
    reference = eager_image_scores(model, inputs, layer=config.stages[0][0])
    n_image, n = reference.shape[1], inputs["input_ids"].shape[1]
    with mmattn.apply(model, config):
        pruned = logits(model, inputs)
    stats = pruning.last_stats(model)
    assert len(stats.stages) == len(config.stages)
    torch.testing.assert_close(stats.image_scores, reference, atol=1e-6, rtol=1e-5)
    image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
    assert torch.equal(stats.image_positions[0], image_positions)

    survivors, expected_tokens = image_positions, [n] * config.stages[0][0]
    for i, ((layer, keep), stage) in enumerate(zip(config.stages, stats.stages)):
        assert stage.layer == layer
        assert torch.equal(stage.image_positions[0], survivors)
        scores = stage.image_scores[0]
        assert (scores >= 0).all() and scores.sum() <= 1 + 1e-5
        budget = min(round(keep * n_image), len(survivors))
        expected = survivors[scores.topk(budget).indices].sort().values
        assert torch.equal(stage.kept_image_positions[0], expected)
        survivors = expected
        following = config.stages[i + 1][0] if i + 1 < len(config.stages) else model.config.text_config.num_hidden_layers
        expected_tokens += [n - n_image + budget] * (following - layer)
    assert torch.equal(stats.kept_image_positions, stats.stages[-1].kept_image_positions)
    assert stats.tokens_per_layer == expected_tokens
    assert len(set(expected_tokens)) == len(config.stages) + 1  # every stage dropped some
    assert pruned.shape[1] == expected_tokens[-1]


def test_pyramid_keep_all_equals_unmodified(deep):
    inputs = encode(deep, [SHORT], [make_image(1)])
    reference = logits(deep.model, inputs)
    config = pyramid(deep.model, keeps=[1.0] * 3)
    with mmattn.apply(deep.model, config):
        full = logits(deep.model, inputs)
        stats = pruning.last_stats(deep.model)
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
    assert stats.tokens_per_layer == [inputs["input_ids"].shape[1]] * deep.model.config.text_config.num_hidden_layers
    assert len(stats.stages) == len(config.stages)


def test_pyramid_padded_batch_equals_single_samples(deep):
    model = deep.model
    images = [make_image(1), make_image(2)]
    batch = encode(deep, [SHORT, LONG], images)
    assert not batch["attention_mask"][0].all()  # left padding
    with mmattn.apply(model, pyramid(model)):
        batch_logits = logits(model, batch)[:, -1]
        batch_stats = pruning.last_stats(model)
        batch_out = generate(model, batch, return_dict_in_generate=True, output_logits=True)
        for i, (conversation, image) in enumerate(zip([SHORT, LONG], images)):
            single = encode(deep, [conversation], [image])
            torch.testing.assert_close(logits(model, single)[0, -1], batch_logits[i], atol=1e-5, rtol=1e-5)
            offset = batch["input_ids"].shape[1] - single["input_ids"].shape[1]  # left padding
            for single_stage, batch_stage in zip(pruning.last_stats(model).stages, batch_stats.stages):
                assert torch.equal(single_stage.kept_image_positions[0] + offset, batch_stage.kept_image_positions[i])
            single_out = generate(model, single, return_dict_in_generate=True, output_logits=True)
            assert_row_generates_alone(model, batch, batch_out, i, single, single_out)


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_pyramid_cached_generate_equals_uncached_loop(deep, monkeypatch, positions):
    """Decode steps over each stage's pruned cache equal full forwards without cache pinned to the same choices."""
    model = deep.model
    inputs = encode(deep, [LONG], [make_image(3)])
    prompt_len = inputs["input_ids"].shape[1]
    config = dataclasses.replace(pyramid(model), positions=positions)
    with mmattn.apply(model, config):
        out = generate(model, inputs, return_dict_in_generate=True, output_logits=True)
        stats = pruning.last_stats(model)
        steps = out.sequences.shape[1] - prompt_len
        text_model = getattr(model.model, "text_model", None) or model.model.language_model
        n_image = stats.image_positions.shape[1]
        for (layer, _), stage in zip(config.stages, stats.stages):  # each stage's first layer caches its tokens
            kept_len = prompt_len - n_image + stage.kept_image_positions.shape[1] + steps - 1
            window = getattr(text_model.layers[layer].self_attn, "sliding_window", None)
            if window is not None:
                kept_len = min(kept_len, window - 1)
            assert out.past_key_values.layers[layer].keys.shape[2] == kept_len

        # Without a cache every forward is a prefill: its stages run in order; pin each to generate()'s choice.
        choices = [stage.kept_image_positions for stage in stats.stages]
        calls = iter(range(10 ** 6))
        monkeypatch.setattr(pruning, "top_image_tokens",
                            lambda scores, positions, budget: choices[next(calls) % len(choices)])
        assert_uncached_loop_matches(model, inputs, out)


def test_pyramid_remove_restores_bit_identical(deep):
    model = deep.model
    inputs = encode(deep, [SHORT], [make_image(4)])
    before, hooks = logits(model, inputs), hook_count(model)
    handle = mmattn.apply(model, pyramid(model))
    assert model.config.text_config._attn_implementation == pruning.IMPLEMENTATION
    assert hook_count(model) > hooks
    with pytest.raises(ValueError, match="applied already"):
        mmattn.apply(model, FastV(layer=1))
    logits(model, inputs)
    generate(model, inputs)
    handle.remove()
    assert model.config.text_config._attn_implementation == "sdpa"
    assert hook_count(model) == hooks
    assert not any(module in pruning._SCORING_LAYERS for module in model.modules())
    assert torch.equal(logits(model, inputs), before)


def test_pyramid_count_keeps_and_clamping():
    """An int keep is a count; a later budget above the tokens still kept (mixed kinds) keeps them all."""
    vlm = build_tiny("tiny/gemma3")
    inputs = encode(vlm, [SHORT], [make_image(1)])
    n_image = int((inputs["input_ids"] == vlm.model.config.image_token_id).sum())
    with mmattn.apply(vlm.model, PyramidDrop(stages=[(1, 3), (2, 0.9)])):
        logits(vlm.model, inputs)
    stats = pruning.last_stats(vlm.model)
    assert round(0.9 * n_image) > 3
    assert [s.kept_image_positions.shape[1] for s in stats.stages] == [3, 3]
    assert [s.image_positions.shape[1] for s in stats.stages] == [n_image, 3]


# VisionZip (arXiv 2412.04467): the shared tests above cover its choice against eager vision attention, batches,
# the cache and remove() on every family it supports; these cover its context tokens and its refusals.
def test_visionzip_config_validation():
    assert VisionZip(keep=64, contextual=10).to_dict() == {"method": "visionzip", "keep": 64, "contextual": 10,
                                                           "merge": "target_plus_mean", "positions": "original",
                                                           "paper_exact": False}
    for bad, message in ((dict(keep=2.0), r"^keep=2.0 is out of range"), (dict(contextual=-1), "^contextual=-1"),
                         (dict(contextual=1.5), "^contextual=1.5"), (dict(contextual=True), "^contextual=True")):
        with pytest.raises(ValueError, match=message):
            VisionZip(**bad)


@pytest.mark.parametrize("merge", ["target_plus_mean", "mean"])
@pytest.mark.parametrize("name", ["tiny/llava", "tiny/gemma3"])
def test_visionzip_context_tokens(name, merge):
    """keep - contextual dominant tokens by score; the contextual targets spread evenly over the rest, each
    entering the LLM merged with the pruned tokens whose embeddings are most similar to it: the official
    target + mean(assigned), or the mean of the target and the assigned tokens."""
    vlm = build(name)
    model, inputs = vlm.model, encode(vlm, [SHORT, LONG], [make_image(5), make_image(6)])
    image_mask = inputs["input_ids"] == model.config.image_token_id
    n_image, budget, contextual = int(image_mask[0].sum()), 8, 3
    scores, embeds = eager_vision_scores(model, inputs), decoder_input(model, inputs, 0)
    text_model = getattr(model.model, "text_model", None) or model.model.language_model
    with mmattn.apply(model, VisionZip(keep=budget, contextual=contextual, merge=merge)):
        captured = {}
        hook = text_model.layers[0].register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
        try:
            logits(model, inputs)
        finally:
            hook.remove()
    stats = pruning.last_stats(model)
    for b in range(2):
        positions = image_mask[b].nonzero().squeeze(1)
        dominant = scores[b].topk(budget - contextual).indices.tolist()
        rest = [i for i in range(n_image) if i not in dominant]
        step = len(rest) // contextual
        targets = [rest[j * step] for j in range(contextual)]
        others = [i for i in rest if i not in targets]
        x = torch.nn.functional.normalize(embeds[b, positions].double(), dim=-1)
        groups = {t: [t] for t in targets}
        for i in others:
            groups[max(targets, key=lambda t: (float(x[i] @ x[t]), -t))].append(i)
        kept = sorted(dominant + targets)
        assert stats.kept_image_positions[b].tolist() == positions[kept].tolist()
        kept_positions = torch.cat([(~image_mask[b]).nonzero().squeeze(1), positions[kept]]).sort().values
        entering = dict(zip(kept_positions.tolist(), captured["x"][b]))
        for t, members in groups.items():
            if merge == "mean":
                want = embeds[b, positions[members]].mean(dim=0)
            else:
                assigned = members[1:]
                want = embeds[b, positions[t]] + (embeds[b, positions[assigned]].mean(dim=0) if assigned else 0)
            torch.testing.assert_close(entering[int(positions[t])], want)
        for i in dominant:
            assert torch.equal(entering[int(positions[i])], embeds[b, positions[i]])


def test_visionzip_rejects_unsupported_unchanged():
    """Every VLM family is scored in its tower; a LLaVA that concatenates several feature layers is not."""
    vlm = build_tiny("tiny/llava")
    vlm.model.config.vision_feature_layer = [-2, -1]
    hooks = hook_count(vlm.model)
    with pytest.raises(ValueError, match=r"VisionZip needs one vision_feature_layer after the embeddings; "
                                         r"LlavaForConditionalGeneration uses \[-2, -1\]"):
        mmattn.apply(vlm.model, VisionZip(keep=0.25))
    assert vlm.model.config.text_config._attn_implementation == vlm.model.config.vision_config._attn_implementation \
        == "sdpa"
    assert hook_count(vlm.model) == hooks and "get_image_features" not in vars(vlm.model.model)


@pytest.mark.parametrize("name", ["tiny/llava-onevision", "tiny/qwen2-vl", "tiny/qwen2.5-vl"])
@pytest.mark.parametrize("method_name", list(METHODS))
def test_video_frames_pruned(name, method_name):
    """Video tokens compete for the budget like image tokens; keep=1 changes nothing; generate() runs on the cache."""
    vlm, method = build_tiny(name), METHODS[method_name]
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": LONG}]}]
    prompt = vlm.processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = dict(vlm.processor(text=[prompt], videos=[random_video(4, 64, 48, seed=3)], return_tensors="pt"))
    video_mask = inputs["input_ids"] == vlm.model.config.video_token_id
    n_video = int(video_mask.sum())
    assert n_video > 0 and not (inputs["input_ids"] == vlm.model.config.image_token_id).any()
    reference = logits(vlm.model, inputs)
    with mmattn.apply(vlm.model, method(vlm.model, 1.0)):
        torch.testing.assert_close(logits(vlm.model, inputs), reference, atol=1e-5, rtol=1e-5)
    config = method(vlm.model, 0.25)
    budget = round(0.25 * n_video)
    reference_scores, expected = reference_choice(vlm.model, inputs, config, budget)
    with mmattn.apply(vlm.model, config):
        generate(vlm.model, inputs)
    stats = pruning.last_stats(vlm.model)
    assert torch.equal(stats.image_positions[0], video_mask[0].nonzero().squeeze(1))
    if reference_scores is not None:
        torch.testing.assert_close(stats.image_scores, reference_scores, atol=1e-6, rtol=1e-5)
    assert torch.equal(stats.kept_image_positions, expected)
    assert stats.decode_steps == MAX_NEW_TOKENS - 1


def test_timing_counts_only_the_pruned_runs_decode_steps():
    """A later generate() without images neither prunes nor adds its decode steps to the last pruned run's stats."""
    vlm = build_tiny("tiny/llava")
    inputs = encode(vlm, [SHORT], [make_image(1)])
    text_only = vlm.processor(text=["USER: hello ASSISTANT:"], return_tensors="pt")
    with mmattn.apply(vlm.model, FastV(layer=1, keep=0.25)):
        generate(vlm.model, inputs)
        stats = pruning.last_stats(vlm.model)
        assert (stats.decode_steps, stats.prefill_seconds > 0) == (MAX_NEW_TOKENS - 1, True)
        generate(vlm.model, text_only)
        assert pruning.last_stats(vlm.model) is stats and stats.decode_steps == MAX_NEW_TOKENS - 1


def official_pdrop_scores(decoder, x, position_embeddings, positions, config) -> torch.Tensor:
    """Reference written from PyramidDrop's official rule (modeling_llama_pdrop.py), batch of one: the decoder layer's
    input_layernorm, q_proj, k_proj and RoPE (at the original ``positions``) on its input ``x`` (the tokens still
    kept), the last token's query row softmaxed over the tokens before it, mean over heads."""
    attn = decoder.self_attn
    x = decoder.input_layernorm(x)
    cos, sin = (t[:, positions] for t in position_embeddings)
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, attn.head_dim
    q = attn.q_proj(x).view(1, -1, heads, dim).transpose(1, 2)
    k = attn.k_proj(x).view(1, -1, kv_heads, dim).transpose(1, 2)
    q, k = q * cos[:, None] + rotate_half(q) * sin[:, None], k * cos[:, None] + rotate_half(k) * sin[:, None]
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    logits = torch.einsum("hd,hnd->hn", q[0, :, -1], k[0]) / math.sqrt(dim)
    return torch.softmax(logits.float(), dim=-1).mean(dim=0)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def test_pyramid_official_ranking_equals_the_official_rule(deep):
    """Default ranking: at each stage layer L, L's own norm and projections on its input rank the survivors; a
    fraction keeps int(N * keep) of the original image tokens (floor)."""
    model = deep.model
    if type(model).__name__ != "LlavaForConditionalGeneration":
        pytest.skip("the official code is LLaVA's (Llama); other families run the same rule with their own RoPE")
    inputs = encode(deep, [SHORT], [make_image(2)])
    n_layers = model.config.text_config.num_hidden_layers
    config = PyramidDrop(stages=[(1, 0.55), (n_layers - 1, 0.3)])
    layers = model.model.language_model.layers
    captured = {}
    def capture(layer):
        def hook(module, args, kwargs):  # registered first: sees the layer's input before pruning
            captured.setdefault(layer, (args[0], kwargs["position_embeddings"]))
        return hook

    hooks = [layers[layer].register_forward_pre_hook(capture(layer), with_kwargs=True) for layer, _ in config.stages]
    with torch.no_grad(), mmattn.apply(model, config):
        model(**inputs)
    for hook in hooks:
        hook.remove()
    stats = pruning.last_stats(model)
    n_image = stats.image_positions.shape[1]
    survivors = torch.arange(inputs["input_ids"].shape[1])
    for (layer, keep), stage in zip(config.stages, stats.stages):
        x, position_embeddings = captured[layer]
        with torch.no_grad():
            scores = official_pdrop_scores(layers[layer], x, position_embeddings, survivors, model.config.text_config)
        image = torch.isin(survivors, stage.image_positions[0])
        torch.testing.assert_close(stage.image_scores[0], scores[image], atol=1e-5, rtol=1e-4)
        budget = int(n_image * keep)
        assert stage.kept_image_positions.shape[1] == budget
        chosen = stage.image_positions[0][scores[image].topk(budget).indices].sort().values
        assert torch.equal(stage.kept_image_positions[0], chosen)
        survivors = torch.cat([survivors[~image], chosen]).sort().values


@torch.no_grad()
def pruned_forward(model, inputs, compact: bool, choose) -> torch.Tensor:
    """Last-token logits of a LLaVA forward written out layer by layer (batch of one, no padding), as the
    official pruning code runs it: ``choose(i, layer, x, position_embeddings, survivors)`` may return the original
    positions that survive from layer i on (or None); the dropped tokens leave the sequence, and the survivors'
    RoPE positions are re-indexed 0..n-1 (``compact``) or stay their original ones."""
    text = model.model.language_model
    x = decoder_input(model, inputs, 0)
    survivors = torch.arange(x.shape[1])

    def rope(x, survivors):
        return text.rotary_emb(x, (torch.arange(len(survivors)) if compact else survivors)[None])

    for i, layer in enumerate(text.layers):
        position_embeddings = rope(x, survivors)
        kept = choose(i, layer, x, position_embeddings, survivors)
        if kept is not None:
            x, survivors = x[:, torch.isin(survivors, kept)], kept
            position_embeddings = rope(x, survivors)
        n = x.shape[1]
        mask = torch.full((n, n), -float("inf")).triu(1)[None, None]
        x = layer(x, attention_mask=mask, position_embeddings=position_embeddings)
        x = x[0] if isinstance(x, tuple) else x
    return model.lm_head(text.norm(x))[0, -1]


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_pyramid_equals_the_official_forward(deep, positions):
    """PyramidDrop's official code (modeling_llama_pdrop.py) written out: at each stage layer L its own norm and
    q/k projections at the current positions rank the surviving image tokens, int(N * keep) remain, positions are
    re-indexed (compact; "original" keeps them). Kept sets at both stages and the logits agree."""
    model = deep.model
    if type(model).__name__ != "LlavaForConditionalGeneration":
        pytest.skip("the official code is LLaVA's (Llama)")
    inputs = encode(deep, [LONG], [make_image(5)])
    n_layers = model.config.text_config.num_hidden_layers
    config = PyramidDrop(stages=[(1, 0.5), (n_layers - 1, 0.2)], positions=positions)
    image = visual_mask(model, inputs["input_ids"])[0]
    official_kept = []

    def choose(i, layer, x, position_embeddings, survivors):
        keep = dict(config.stages).get(i)
        if keep is None:
            return None
        scores = official_pdrop_scores(layer, x, position_embeddings, torch.arange(len(survivors)),
                                       model.config.text_config)
        candidates = image[survivors]
        chosen = survivors[candidates][scores[candidates].topk(int(int(image.sum()) * keep)).indices].sort().values
        official_kept.append(chosen)
        return torch.cat([survivors[~candidates], chosen]).sort().values

    expected = pruned_forward(model, inputs, positions == "compact", choose)
    with mmattn.apply(model, config):
        got = logits(model, inputs)[0, -1]
    stages = pruning.last_stats(model).stages
    for stage, kept in zip(stages, official_kept, strict=True):
        assert torch.equal(stage.kept_image_positions[0], kept)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if positions == "compact":  # the re-indexing matters here: the same kept tokens at original positions differ
        kept = iter(official_kept)

        def replay(i, layer, x, position_embeddings, survivors):
            if i not in dict(config.stages):
                return None
            return torch.cat([survivors[~image[survivors]], next(kept)]).sort().values

        assert not torch.allclose(got, pruned_forward(model, inputs, False, replay), atol=1e-4)


@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("method_name", list(METHODS))
def test_logits_equal_a_reference_forward(method_name, positions):
    """Each method's kept set (chosen by the independent references above) run through the written-out forward:
    the logits agree, with compact positions (the official code of SparseVLM, DivPrune, VisionZip) and original
    ones (FastV's)."""
    vlm = _reference_vlm()
    model = vlm.model
    inputs = encode(vlm, [LONG], [make_image(6)])
    config = METHODS[method_name](model, 0.25, positions=positions)
    budget = round(0.25 * int(visual_mask(model, inputs["input_ids"]).sum()))
    _, kept_images = reference_choice(model, inputs, config, budget)
    image = visual_mask(model, inputs["input_ids"])[0]

    def choose(i, layer, x, position_embeddings, survivors):
        return torch.cat([survivors[~image], kept_images[0]]).sort().values if i == config.layer else None

    expected = pruned_forward(model, inputs, positions == "compact", choose)
    with mmattn.apply(model, config):
        got = logits(model, inputs)[0, -1]
    assert torch.equal(pruning.last_stats(model).kept_image_positions[0], kept_images[0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _reference_vlm() -> TinyVLM:
    if "llava" not in _UNEQUAL_VLMS:
        _UNEQUAL_VLMS["llava"] = build_tiny("tiny/llava")
    return _UNEQUAL_VLMS["llava"]


def test_compact_positions_rule():
    """Per sample, the values the real tokens use (over every M-RoPE axis) become consecutive from the first; the
    shift is what a later token moves down by; an earlier chunk's shift carries on."""
    ids = torch.tensor([[0, 1, 4, 5, 9], [2, 3, 4, 7, 8]])
    real = torch.tensor([[True, True, True, True, True], [False, True, True, True, True]])
    out, shift = pruning.compact_positions(ids, real)
    assert out.tolist() == [[0, 1, 2, 3, 4], [3, 3, 4, 5, 6]] and shift.tolist() == [5, 2]  # padding maps anywhere
    mrope = torch.tensor([[[0, 1, 1, 1, 5]], [[0, 1, 1, 3, 5]], [[0, 1, 3, 3, 5]]])  # (t, h, w) axes, one sample
    out, shift = pruning.compact_positions(mrope, torch.ones(1, 5, dtype=torch.bool), before=torch.tensor([10]))
    assert out[:, 0].tolist() == [[-10, -9, -9, -9, -7], [-10, -9, -9, -8, -7], [-10, -9, -8, -8, -7]]
    assert shift.tolist() == [12]


def chat_turn(vlm: TinyVLM, question: str, image, first: bool) -> dict:
    """One user turn with one image, through the generation prompt (a later turn without the BOS token)."""
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = vlm.processor.apply_chat_template(chat, add_generation_prompt=True)
    return dict(vlm.processor(text=[text], images=[image], return_tensors="pt",
                              **({} if first else {"add_special_tokens": False})))


@torch.no_grad()
def two_turn_chat(model, vlm: TinyVLM) -> tuple[dict, object, list, list]:
    """A chat with an image in each turn through generate() with the cache: (the whole conversation's inputs for
    a forward without cache, the second generate()'s output, each turn's stats of the pruning applied)."""
    first, second = chat_turn(vlm, SHORT, make_image(1), True), chat_turn(vlm, LONG, make_image(2), False)
    out = generate(model, first, return_dict_in_generate=True)
    stats = [pruning.last_stats(model)]
    ids = torch.cat([out.sequences, second["input_ids"]], dim=1)
    media = {k: v for k, v in second.items() if k not in ("input_ids", "attention_mask")}
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=out.past_key_values,
                         max_new_tokens=MAX_NEW_TOKENS, do_sample=False, return_dict_in_generate=True,
                         output_logits=True, **media)
    stats.append(pruning.last_stats(model))
    whole = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    for key, value in media.items():  # both images (LLaVA-OneVision's batch_num_images too, as the baseline takes it)
        whole[key] = torch.cat([first[key], value])
    return whole, out, stats


@pytest.mark.filterwarnings("ignore:.*past_key_values")
@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method_name", list(METHODS) + ["pyramiddrop"])
@pytest.mark.parametrize("name", ["tiny/llava", "tiny/llava-onevision"])
def test_two_turn_chat_equals_uncached_loop(name, method_name, positions, monkeypatch):
    """The second turn's image is pruned in its own prefill chunk, after the cached first turn: each decode step
    equals a forward without cache over the whole conversation that keeps the same image tokens of both turns."""
    key = name + (":deep" if method_name == "pyramiddrop" else "")
    if key not in _UNEQUAL_VLMS:
        _UNEQUAL_VLMS[key] = build_deep(key) if method_name == "pyramiddrop" else build_tiny(name)
    vlm = _UNEQUAL_VLMS[key]
    model = vlm.model
    layers = model.config.text_config.num_hidden_layers
    config = (PyramidDrop(stages=((1, 0.5), (layers - 1, 0.25)), positions=positions) if method_name == "pyramiddrop"
              else METHODS[method_name](model, 0.25, positions=positions))
    with mmattn.apply(model, config):
        whole, out, (first, second) = two_turn_chat(model, vlm)
        offset = first.image_positions.shape[1]
        assert int(second.image_positions.min()) > int(first.image_positions.max())  # counted from turn 1
        assert second.kept_image_positions.shape[1] == first.kept_image_positions.shape[1]  # its own budget
        # Without a cache the whole conversation is one prefill; pin each stage to both turns' choices.
        choices = [torch.cat([a.kept_image_positions, b.kept_image_positions], dim=1)
                   for a, b in zip(first.stages, second.stages)]
        calls = iter(range(10 ** 6))
        monkeypatch.setattr(pruning, "top_image_tokens",
                            lambda scores, positions, budget: choices[next(calls) % len(choices)])
        assert_uncached_loop_matches(model, whole, out)
    assert offset


@pytest.mark.filterwarnings("ignore:.*past_key_values")
def test_two_turn_chat_keep_all_equals_unmodified():
    """Qwen2-VL: transformers' own chunked prefill gives M-RoPE positions a whole-conversation forward does not (so
    no uncached loop to match); keeping every token in both turns equals the unmodified two-turn chat."""
    vlm = build_tiny("tiny/qwen2-vl")
    model = vlm.model
    first, second = chat_turn(vlm, SHORT, make_image(1), True), chat_turn(vlm, LONG, make_image(2), False)

    def chat():
        with torch.no_grad():
            out = generate(model, first, return_dict_in_generate=True)
            ids = torch.cat([out.sequences, second["input_ids"]], dim=1)
            media = {k: v for k, v in second.items() if k not in ("input_ids", "attention_mask")}
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  past_key_values=out.past_key_values, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                  return_dict_in_generate=True, output_logits=True, **media)

    reference = chat()
    for config in (FastV(layer=1, keep=1.0, positions="compact"), PyramidDrop(stages=((1, 1.0),), paper_exact=True)):
        with mmattn.apply(model, config):
            out = chat()
        assert torch.equal(out.sequences, reference.sequences)
        for got, expected in zip(out.logits, reference.logits):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
