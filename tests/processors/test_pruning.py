"""FastV (arXiv 2403.06764) on the tiny LLaVA (Llama) and Qwen2-VL (M-RoPE) models, on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import mmattn
from mmattn import FastV
from mmattn.processors import pruning
from mmattn.testing import TinyVLM, build_tiny

NAMES = ["tiny/llava", "tiny/qwen2-vl"]
MAX_NEW_TOKENS = 4
LAYER = 1  # the tiny text models have 2 layers: score in layer 0, prune layer 1


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


SHORT, LONG = chat("What is this?"), chat("Describe every object in this picture, in detail.")


def make_image(seed: int, height: int = 48, width: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(vlm: TinyVLM, chats: list, images: list) -> dict:
    prompts = [vlm.processor.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    return dict(vlm.processor(text=prompts, images=images, padding=True, return_tensors="pt"))


def pre_hook_count(model) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module", params=NAMES)
def vlm(request) -> TinyVLM:
    return build_tiny(request.param)


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@torch.no_grad()
def generate(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, **kwargs)


@torch.no_grad()
def eager_image_scores(model, inputs) -> torch.Tensor:
    """Reference: eager attention of the last query in layer LAYER-1, mean over heads, at the image tokens."""
    model.set_attn_implementation({"text_config": "eager"})
    try:
        attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    last_row = attentions[LAYER - 1][:, :, -1].mean(dim=1)
    image_mask = inputs["input_ids"] == model.config.image_token_id
    return last_row[image_mask].view(last_row.shape[0], -1)


def test_config_validation():
    assert FastV(layer=2, keep=0.25).to_dict() == {"method": "fastv", "layer": 2, "keep": 0.25}
    for bad in (dict(layer=0), dict(layer=1.0), dict(keep=1.5), dict(keep=-1), dict(keep=True), dict(keep="all")):
        with pytest.raises(ValueError, match="layer|keep"):
            FastV(**bad)


def test_keep_all_equals_unmodified(vlm):
    inputs = encode(vlm, [SHORT], [make_image(1)])
    reference = logits(vlm.model, inputs)
    with mmattn.apply(vlm.model, FastV(layer=LAYER, keep=1.0)):
        full = logits(vlm.model, inputs)
        tokens_per_layer = pruning.last_stats(vlm.model).tokens_per_layer
    torch.testing.assert_close(full, reference, atol=1e-5, rtol=1e-5)
    assert tokens_per_layer == [inputs["input_ids"].shape[1]] * 2


def test_choice_matches_eager_reference(vlm):
    inputs = encode(vlm, [SHORT], [make_image(1)])
    reference = eager_image_scores(vlm.model, inputs)
    n_image = reference.shape[1]
    with mmattn.apply(vlm.model, FastV(layer=LAYER, keep=0.25)):
        pruned = logits(vlm.model, inputs)
    stats = pruning.last_stats(vlm.model)
    torch.testing.assert_close(stats.image_scores, reference, atol=1e-6, rtol=1e-5)
    budget = round(0.25 * n_image)
    image_positions = (inputs["input_ids"][0] == vlm.model.config.image_token_id).nonzero().squeeze(1)
    expected = image_positions[reference[0].topk(budget).indices].sort().values
    assert torch.equal(stats.kept_image_positions[0], expected)

    # Layer 1 saw every text token and only the kept image tokens; the logits are those of the kept tokens.
    n = inputs["input_ids"].shape[1]
    assert stats.tokens_per_layer == [n, n - n_image + budget]
    assert stats.equivalent_tokens == (2 * n - n_image + budget) / 2
    assert pruned.shape[1] == n - n_image + budget
    assert not torch.allclose(pruned[:, -1], logits(vlm.model, inputs)[:, -1])


def test_padded_batch_equals_single_samples(vlm):
    images = [make_image(1), make_image(2)]
    batch = encode(vlm, [SHORT, LONG], images)
    assert not batch["attention_mask"][0].all()  # left padding
    with mmattn.apply(vlm.model, FastV(layer=LAYER, keep=0.25)):
        batch_logits = logits(vlm.model, batch)[:, -1]
        batch_out = generate(vlm.model, batch, return_dict_in_generate=True, output_logits=True)
        for i, (conversation, image) in enumerate(zip([SHORT, LONG], images)):
            single = encode(vlm, [conversation], [image])
            torch.testing.assert_close(logits(vlm.model, single)[0, -1], batch_logits[i], atol=1e-5, rtol=1e-5)
            single_out = generate(vlm.model, single, return_dict_in_generate=True, output_logits=True)
            new_ids = single_out.sequences[0, single["input_ids"].shape[1]:]
            assert torch.equal(new_ids, batch_out.sequences[i, batch["input_ids"].shape[1]:])
            for step_batch, step_single in zip(batch_out.logits, single_out.logits):  # decode steps too
                torch.testing.assert_close(step_single[0], step_batch[i], atol=1e-5, rtol=1e-5)


def test_cached_generate_equals_uncached_loop(vlm, monkeypatch):
    """Decode steps over the pruned cache equal full forwards without cache that keep the same image tokens."""
    model = vlm.model
    inputs = encode(vlm, [LONG], [make_image(3)])
    prompt_len = inputs["input_ids"].shape[1]
    with mmattn.apply(model, FastV(layer=LAYER, keep=0.25)):
        out = generate(model, inputs, return_dict_in_generate=True, output_logits=True)
        stats = pruning.last_stats(model)
        kept = prompt_len - stats.image_positions.shape[1] + stats.kept_image_positions.shape[1]
        steps = out.sequences.shape[1] - prompt_len
        cache = out.past_key_values
        assert cache.layers[0].keys.shape[2] == prompt_len + steps - 1
        assert cache.layers[LAYER].keys.shape[2] == kept + steps - 1

        # Without a cache every forward is a prefill; pin its choice to the one generate() made.
        monkeypatch.setattr(pruning, "top_image_tokens", lambda scores, positions, budget: stats.kept_image_positions)
        step_inputs = dict(inputs)
        for step in range(steps):
            step_logits = logits(model, {**step_inputs, "use_cache": False})[:, -1]
            torch.testing.assert_close(step_logits, out.logits[step], atol=1e-5, rtol=1e-5)
            next_id = step_logits.argmax(dim=-1, keepdim=True)
            assert torch.equal(next_id[:, 0], out.sequences[:, prompt_len + step])
            step_inputs["input_ids"] = torch.cat([step_inputs["input_ids"], next_id], dim=1)
            step_inputs["attention_mask"] = torch.cat([step_inputs["attention_mask"], torch.ones_like(next_id)], dim=1)
            if "mm_token_type_ids" in step_inputs:
                step_inputs["mm_token_type_ids"] = torch.cat(
                    [step_inputs["mm_token_type_ids"], torch.zeros_like(next_id)], dim=1)


def test_remove_restores_bit_identical(vlm):
    model = vlm.model
    inputs = encode(vlm, [SHORT], [make_image(4)])
    before, hooks = logits(model, inputs), pre_hook_count(model)
    handle = mmattn.apply(model, FastV(layer=LAYER, keep=0.5))
    assert model.config.text_config._attn_implementation == pruning.IMPLEMENTATION
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert pre_hook_count(model) > hooks
    with pytest.raises(ValueError, match="applied already"):
        mmattn.apply(model, FastV(layer=LAYER))
    logits(model, inputs)
    handle.remove()
    assert model.config.text_config._attn_implementation == "sdpa"
    assert pre_hook_count(model) == hooks
    assert torch.equal(logits(model, inputs), before)


def test_rejects_unsupported_model_unchanged():
    model = build_tiny("tiny/gemma3").model
    implementations = (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation)
    hooks = pre_hook_count(model)
    with pytest.raises(ValueError, match="Gemma3ForConditionalGeneration.*LlavaForConditionalGeneration"):
        mmattn.apply(model, FastV(layer=1))
    assert (model.config.text_config._attn_implementation, model.config.vision_config._attn_implementation) == \
        implementations
    assert pre_hook_count(model) == hooks


def test_rejects_unequal_image_counts():
    vlm = build_tiny("tiny/qwen2-vl")  # image token counts follow the image size
    batch = encode(vlm, [SHORT, SHORT], [make_image(1), make_image(2, height=96, width=96)])
    with mmattn.apply(vlm.model, FastV(layer=LAYER)), pytest.raises(ValueError, match="same number of image tokens"):
        logits(vlm.model, batch)


def test_rejects_layer_out_of_range(vlm):
    hooks = pre_hook_count(vlm.model)
    with pytest.raises(ValueError, match="layer=2 is out of range"):
        mmattn.apply(vlm.model, FastV(layer=2))
    assert vlm.model.config.text_config._attn_implementation == "sdpa"
    assert pre_hook_count(vlm.model) == hooks
