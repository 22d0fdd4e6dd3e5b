"""End-to-end checks of the tiny LLaVA-family VLMs: processor -> generate() -> decode, on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmattn.testing import TinyVLM, build_tiny, tiny_names, tiny_spec
from mmattn.testing.media import (LONG_QUESTION, QUESTION, VIDEO_QUESTION, question_inputs, random_image,
                                  random_video)

NAMES = ["tiny/llava", "tiny/llava-onevision"]


@pytest.fixture(scope="module", params=NAMES)
def name(request) -> str:
    return request.param


def image_features_per_image(vlm: TinyVLM, inputs) -> list[int]:
    """How many embeddings the vision tower + projector produce for each image: what the LM consumes."""
    model = vlm.model
    kwargs = {"pixel_values": inputs["pixel_values"]}
    if "image_sizes" in inputs:  # OneVision: AnyRes tiles, unpadding and newline embeddings
        kwargs.update(image_sizes=inputs["image_sizes"], batch_num_images=inputs["batch_num_images"])
    with torch.no_grad():
        features = model.get_image_features(**kwargs).pooler_output
    return [f.shape[0] for f in features]


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

    # The placeholder ids in the config are the tokenizer's.
    assert config.image_token_id == processor.image_token_id
    assert config.image_token_id == tokenizer.convert_tokens_to_ids(processor.image_token)
    assert config.image_token_id == tokenizer.image_token_id
    assert tokenizer.decode([config.image_token_id]) == processor.image_token
    if hasattr(config, "video_token_id"):
        assert config.video_token_id == processor.video_token_id == tokenizer.video_token_id

    # Tiny, GQA, vocabulary = the tokenizer.
    text = config.text_config
    assert config.vision_config.hidden_size <= 64 and text.hidden_size <= 64
    assert text.num_hidden_layers == 2 and config.vision_config.num_hidden_layers <= 2
    assert text.num_attention_heads >= 2 and text.num_key_value_heads < text.num_attention_heads
    assert text.vocab_size == len(tokenizer) == model.get_input_embeddings().num_embeddings

    # Padding and stopping.
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token is not None
    gen = model.generation_config
    assert gen.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.eos_token_id in np.atleast_1d(gen.eos_token_id)


def test_chat_template(name, vlm):
    processor = vlm.processor
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt.count(processor.image_token) == 1
    assert "What is this?" in prompt
    tokenizer = processor.tokenizer
    assert prompt == tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    if name == "tiny/llava":
        assert prompt == "USER: <image>\nWhat is this? ASSISTANT:"
    else:
        assert prompt == "<|im_start|>user <image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
    # Text-only content and multi-turn conversations render too.
    chat = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
    ]
    rendered = processor.apply_chat_template(chat, add_generation_prompt=True)
    assert rendered.index("Hi") < rendered.index("Hello") < rendered.index("Bye")


def test_generate_one_image(name, vlm, checks):
    processor, config = vlm.processor, vlm.model.config
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[random_image(64, 48, seed=1)], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    assert image_features_per_image(vlm, inputs) == [n_image_tokens]
    if name == "tiny/llava":
        assert n_image_tokens == 64  # (64 px / 8 px patches)^2, CLS dropped
        assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    else:
        assert 20 <= n_image_tokens <= 88  # base tile 16 + unpadded 2x2 grid + newlines
        assert inputs["pixel_values"].shape[-3:] == (3, 32, 32)

    out = checks.generate(vlm, inputs)
    checks.check_generated(vlm, inputs, out)

    # The same conversation through apply_chat_template(tokenize=True) gives the same ids.
    image = random_image(64, 48, seed=1)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    chat = [{"role": "user", "content": content}]
    direct = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(direct["input_ids"], inputs["input_ids"])


def test_generate_padded_batch(vlm, checks):
    processor, model = vlm.processor, vlm.model
    short = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    long = processor.apply_chat_template(LONG_QUESTION, add_generation_prompt=True)
    images = [random_image(64, 48, seed=1), random_image(40, 80, seed=2)]
    inputs = processor(text=[short, long], images=images, padding=True, return_tensors="pt")

    pads = checks.left_padding(inputs, processor.tokenizer.pad_token_id)
    assert len(pads) == 2 and pads[0] > 0 and pads[1] == 0  # the short prompt is padded on the left

    per_row = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    assert image_features_per_image(vlm, inputs) == per_row

    out = checks.generate(vlm, inputs)
    texts = checks.check_generated(vlm, inputs, out)
    assert len(texts) == 2

    # Padding does not change the answer: the padded row's next-token logits match an unpadded run.
    checks.assert_padding_invariant(vlm, inputs, [short, long], images)


def test_multi_image_prompt(vlm, checks):
    processor, model = vlm.processor, vlm.model
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    chat = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    images = [[random_image(64, 48, 1), random_image(48, 64, 2)]]  # one prompt, two images
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    features = image_features_per_image(vlm, inputs)
    assert len(features) == 2
    assert sum(features) == int((inputs["input_ids"] == model.config.image_token_id).sum())
    checks.check_generated(vlm, inputs, checks.generate(vlm, inputs))


def test_onevision_video(checks):
    vlm = build_tiny("tiny/llava-onevision")
    processor, model = vlm.processor, vlm.model
    prompt = processor.apply_chat_template(VIDEO_QUESTION, add_generation_prompt=True)
    assert prompt.count("<video>") == 1
    inputs = processor(text=[prompt], videos=[random_video(4, 64, 48, seed=3)], return_tensors="pt")
    assert inputs["pixel_values_videos"].shape == (1, 4, 3, 32, 32)
    n_video_tokens = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert n_video_tokens == 4 * 4 + 1  # 2x2 pooled features per frame + one newline
    with torch.no_grad():
        features = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
    assert features.shape[:2] == (1, n_video_tokens)
    checks.check_generated(vlm, inputs, checks.generate(vlm, inputs))

    # A padded batch mixing a video prompt and a (longer) image prompt.
    image_prompt = processor.apply_chat_template(LONG_QUESTION, add_generation_prompt=True)
    checks.check_padded_batch(
        vlm,
        text=[prompt, image_prompt],
        images=[random_image(64, 48, seed=1)],
        videos=[random_video(4, 64, 48, seed=3)],
    )


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name, checks):
    checks.assert_seeded(name, question_inputs)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16(name, checks):
    checks.assert_bfloat16(name, question_inputs)
