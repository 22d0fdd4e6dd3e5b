"""End-to-end checks of the tiny Qwen2-VL / Qwen2.5-VL models: processor -> generate() -> decode, on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmattn.testing import TinyVLM, tiny_names, tiny_spec
from mmattn.testing.media import (LONG_QUESTION, QUESTION, VIDEO_QUESTION, question_inputs, random_image,
                                  random_video)

NAMES = ["tiny/qwen2-vl", "tiny/qwen2.5-vl"]
MERGE = 4  # 2x2 patches per LLM token


@pytest.fixture(scope="module", params=NAMES)
def name(request) -> str:
    return request.param


def features_per_item(vlm: TinyVLM, inputs, modality: str = "image") -> list[int]:
    """How many merged embeddings the vision tower produces per image/video: what the LM consumes."""
    with torch.no_grad():
        if modality == "image":
            out = vlm.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        else:
            out = vlm.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    return [f.shape[0] for f in out.pooler_output]


def test_registered():
    names = tiny_names("vlm")
    for name in NAMES:
        assert name in names
        spec = tiny_spec(name)
        assert spec.kind == "vlm"
        assert spec.defaults.get("max_new_tokens")


def test_model_and_processor_agree(name, vlm, checks):
    model, processor = vlm.model, vlm.processor
    tokenizer = processor.tokenizer
    config = model.config
    checks.assert_ready(name, vlm)

    # Placeholder and delimiter ids in the config are the tokenizer's.
    ids = tokenizer.convert_tokens_to_ids
    assert config.image_token_id == processor.image_token_id == ids("<|image_pad|>")
    assert config.video_token_id == processor.video_token_id == ids("<|video_pad|>")
    assert config.vision_start_token_id == ids("<|vision_start|>")
    assert config.vision_end_token_id == ids("<|vision_end|>")
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|image_pad|>", "<|video_pad|>"):
        assert tokenizer.encode(token, add_special_tokens=False) == [ids(token)]

    # Tiny, GQA, M-RoPE over the whole rotary half of head_dim, vocabulary = the tokenizer.
    text, vision = config.text_config, config.vision_config
    assert text.hidden_size <= 64 and text.num_hidden_layers == 2 and vision.depth <= 2
    assert text.num_attention_heads >= 2 and text.num_key_value_heads < text.num_attention_heads
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert text.vocab_size == len(tokenizer) == model.get_input_embeddings().num_embeddings
    if name == "tiny/qwen2.5-vl":
        assert vision.window_size == 56 and list(vision.fullatt_block_indexes) == [1]
        assert vision.out_hidden_size == text.hidden_size

    # Padding and stopping.
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    gen = model.generation_config
    assert gen.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in np.atleast_1d(gen.eos_token_id)


def test_chat_template(vlm):
    processor = vlm.processor
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    tokenizer = processor.tokenizer
    assert prompt == tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    video_prompt = processor.apply_chat_template(VIDEO_QUESTION, add_generation_prompt=True)
    assert "<|vision_start|><|video_pad|><|vision_end|>What happens?" in video_prompt
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
    ]
    rendered = processor.apply_chat_template(chat)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert rendered.endswith("<|im_start|>assistant\nHello<|im_end|>\n")


@pytest.mark.parametrize("size", [(64, 48), (150, 200), (300, 300)])  # width, height
def test_generate_one_image(vlm, size, checks):
    processor, config = vlm.processor, vlm.model.config
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[random_image(*size, seed=1)], return_tensors="pt")
    assert {"mm_token_type_ids", "pixel_values", "image_grid_thw"} <= set(inputs)
    n_image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    grid = inputs["image_grid_thw"]
    assert grid.shape == (1, 3) and grid[0, 0] == 1
    assert n_image_tokens == int(grid.prod()) // MERGE
    assert 16 <= n_image_tokens <= 64
    assert inputs["pixel_values"].shape == (int(grid.prod()), 3 * 2 * 14 * 14)
    assert features_per_item(vlm, inputs) == [n_image_tokens]
    assert int((inputs["mm_token_type_ids"] == 1).sum()) == n_image_tokens

    checks.check_generated(vlm, inputs, checks.generate(vlm, inputs))


def test_chat_template_tokenize(vlm, checks):
    processor = vlm.processor
    image = random_image(64, 48, seed=1)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    chat = [{"role": "user", "content": content}]
    direct = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image], return_tensors="pt")
    assert torch.equal(direct["input_ids"], inputs["input_ids"])
    checks.check_generated(vlm, direct, checks.generate(vlm, direct))


def test_generate_padded_batch(vlm, checks):
    processor, model = vlm.processor, vlm.model
    short = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    long = processor.apply_chat_template(LONG_QUESTION, add_generation_prompt=True)
    images = [random_image(64, 48, seed=1), random_image(150, 200, seed=2)]
    inputs = processor(text=[short, long], images=images, padding=True, return_tensors="pt")

    pads = checks.left_padding(inputs, processor.tokenizer.pad_token_id)
    assert len(pads) == 2 and pads[0] > 0 and pads[1] == 0  # the short prompt is padded on the left

    per_row = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    assert per_row[0] != per_row[1]  # images of different sizes get different token counts
    assert features_per_item(vlm, inputs) == per_row
    assert per_row == (inputs["image_grid_thw"].prod(-1) // MERGE).tolist()

    texts = checks.check_generated(vlm, inputs, checks.generate(vlm, inputs))
    assert len(texts) == 2

    # Padding (and M-RoPE positions under it) does not change the answer.
    checks.assert_padding_invariant(vlm, inputs, [short, long], images)


def test_multi_image_prompt(vlm, checks):
    processor, model = vlm.processor, vlm.model
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    chat = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    images = [[random_image(64, 48, 1), random_image(150, 200, 2)]]  # one prompt, two images
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    features = features_per_item(vlm, inputs)
    assert len(features) == 2
    assert sum(features) == int((inputs["input_ids"] == model.config.image_token_id).sum())
    checks.check_generated(vlm, inputs, checks.generate(vlm, inputs))


def test_video(vlm, checks):
    processor, model = vlm.processor, vlm.model
    prompt = processor.apply_chat_template(VIDEO_QUESTION, add_generation_prompt=True)
    inputs = processor(text=[prompt], videos=[random_video(4, 128, 96, seed=3)], return_tensors="pt")
    grid = inputs["video_grid_thw"]
    assert grid.shape == (1, 3) and grid[0, 0] == 2  # 4 frames / temporal patch 2
    n_video_tokens = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert n_video_tokens == int(grid.prod()) // MERGE
    assert 8 <= n_video_tokens <= 32
    assert features_per_item(vlm, inputs, "video") == [n_video_tokens]
    checks.check_generated(vlm, inputs, checks.generate(vlm, inputs))

    # A padded batch mixing a video prompt and a (longer) image prompt.
    image_prompt = processor.apply_chat_template(LONG_QUESTION, add_generation_prompt=True)
    checks.check_padded_batch(
        vlm,
        text=[prompt, image_prompt],
        images=[random_image(64, 48, seed=1)],
        videos=[random_video(4, 128, 96, seed=3)],
    )


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name, checks):
    checks.assert_seeded(name, question_inputs)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16(name, checks):
    checks.assert_bfloat16(name, question_inputs)
