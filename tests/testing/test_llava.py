"""End-to-end checks of the tiny LLaVA-family VLMs: processor -> generate() -> decode, on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmattn.testing import TinyVLM, build_tiny, tiny_names, tiny_spec

NAMES = ["tiny/llava", "tiny/llava-onevision"]
MAX_NEW_TOKENS = 4

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
LONG_QUESTION = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "Describe every object in this picture, in detail."},
        ],
    }
]
VIDEO_QUESTION = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]


def make_image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_video(frames: int, height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module", params=NAMES)
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def vlm(name) -> TinyVLM:
    return build_tiny(name)


def image_features_per_image(vlm: TinyVLM, inputs) -> list[int]:
    """How many embeddings the vision tower + projector produce for each image: what the LM consumes."""
    model = vlm.model
    kwargs = {"pixel_values": inputs["pixel_values"]}
    if "image_sizes" in inputs:  # OneVision: AnyRes tiles, unpadding and newline embeddings
        kwargs.update(image_sizes=inputs["image_sizes"], batch_num_images=inputs["batch_num_images"])
    with torch.no_grad():
        features = model.get_image_features(**kwargs).pooler_output
    return [f.shape[0] for f in features]


def generate(vlm: TinyVLM, inputs) -> torch.Tensor:
    with torch.no_grad():
        return vlm.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)


def check_generated(vlm: TinyVLM, inputs, out: torch.Tensor) -> list[str]:
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape[0] == inputs["input_ids"].shape[0]
    assert prompt_len < out.shape[1] <= prompt_len + MAX_NEW_TOKENS
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    texts = vlm.processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    assert len(texts) == out.shape[0] and all(isinstance(t, str) for t in texts)
    return texts


def test_registered():
    names = tiny_names("vlm")
    for name in NAMES:
        assert name in names
        spec = tiny_spec(name)
        assert spec.kind == "vlm"
        assert spec.defaults.get("max_new_tokens")


def test_model_and_processor_agree(name, vlm):
    model, processor = vlm.model, vlm.processor
    tokenizer = processor.tokenizer
    config = model.config
    assert type(model).__name__ == tiny_spec(name).architecture
    assert not model.training
    assert next(model.parameters()).device.type == "cpu"
    assert model.dtype == torch.float32
    assert config._attn_implementation == "sdpa"
    assert config.text_config._attn_implementation == "sdpa"
    assert config.vision_config._attn_implementation == "sdpa"

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


def test_generate_one_image(name, vlm):
    processor, config = vlm.processor, vlm.model.config
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[make_image(48, 64, seed=1)], return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == config.image_token_id).sum())
    assert image_features_per_image(vlm, inputs) == [n_image_tokens]
    if name == "tiny/llava":
        assert n_image_tokens == 64  # (64 px / 8 px patches)^2, CLS dropped
        assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    else:
        assert 20 <= n_image_tokens <= 88  # base tile 16 + unpadded 2x2 grid + newlines
        assert inputs["pixel_values"].shape[-3:] == (3, 32, 32)

    out = generate(vlm, inputs)
    check_generated(vlm, inputs, out)

    # The same conversation through apply_chat_template(tokenize=True) gives the same ids.
    image = make_image(48, 64, seed=1)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    chat = [{"role": "user", "content": content}]
    direct = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(direct["input_ids"], inputs["input_ids"])


def test_generate_padded_batch(vlm):
    processor, model = vlm.processor, vlm.model
    short = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    long = processor.apply_chat_template(LONG_QUESTION, add_generation_prompt=True)
    images = [make_image(48, 64, seed=1), make_image(80, 40, seed=2)]
    inputs = processor(text=[short, long], images=images, padding=True, return_tensors="pt")

    mask = inputs["attention_mask"]
    assert mask.shape[0] == 2 and mask[1].all() and not mask[0].all()
    assert mask[0, 0] == 0 and mask[0, -1] == 1  # left padding
    assert (inputs["input_ids"][0][mask[0] == 0] == processor.tokenizer.pad_token_id).all()

    per_row = (inputs["input_ids"] == model.config.image_token_id).sum(-1).tolist()
    assert image_features_per_image(vlm, inputs) == per_row

    out = generate(vlm, inputs)
    texts = check_generated(vlm, inputs, out)
    assert len(texts) == 2

    # Padding does not change the answer: the padded row's next-token logits match an unpadded run.
    single = processor(text=[short], images=images[:1], return_tensors="pt")
    with torch.no_grad():
        batch_logits = model(**inputs).logits[0, -1]
        single_logits = model(**single).logits[0, -1]
    torch.testing.assert_close(batch_logits, single_logits, atol=1e-4, rtol=1e-4)


def test_multi_image_prompt(vlm):
    processor, model = vlm.processor, vlm.model
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]
    chat = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    images = [[make_image(48, 64, 1), make_image(64, 48, 2)]]  # one prompt, two images
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    features = image_features_per_image(vlm, inputs)
    assert len(features) == 2
    assert sum(features) == int((inputs["input_ids"] == model.config.image_token_id).sum())
    check_generated(vlm, inputs, generate(vlm, inputs))


def test_onevision_video():
    vlm = build_tiny("tiny/llava-onevision")
    processor, model = vlm.processor, vlm.model
    prompt = processor.apply_chat_template(VIDEO_QUESTION, add_generation_prompt=True)
    assert prompt.count("<video>") == 1
    inputs = processor(text=[prompt], videos=[make_video(4, 48, 64, seed=3)], return_tensors="pt")
    assert inputs["pixel_values_videos"].shape == (1, 4, 3, 32, 32)
    n_video_tokens = int((inputs["input_ids"] == model.config.video_token_id).sum())
    assert n_video_tokens == 4 * 4 + 1  # 2x2 pooled features per frame + one newline
    with torch.no_grad():
        features = model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output
    assert features.shape[:2] == (1, n_video_tokens)
    check_generated(vlm, inputs, generate(vlm, inputs))

    # A padded batch mixing a video prompt and a (longer) image prompt.
    image_prompt = processor.apply_chat_template(LONG_QUESTION, add_generation_prompt=True)
    batch = processor(
        text=[prompt, image_prompt],
        images=[make_image(48, 64, seed=1)],
        videos=[make_video(4, 48, 64, seed=3)],
        padding=True,
        return_tensors="pt",
    )
    assert not batch["attention_mask"].all()
    check_generated(vlm, batch, generate(vlm, batch))


@pytest.mark.parametrize("name", NAMES)
def test_deterministic(name):
    first, again, other = build_tiny(name, seed=0), build_tiny(name, seed=0), build_tiny(name, seed=1)
    sd0, sd0b, sd1 = (m.model.state_dict() for m in (first, again, other))
    assert sd0.keys() == sd0b.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd0b[k]) for k in sd0)
    assert not all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    assert not torch.equal(
        first.model.get_input_embeddings().weight, other.model.get_input_embeddings().weight
    )

    processor = first.processor
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[make_image(48, 64, seed=1)], return_tensors="pt")
    assert torch.equal(generate(first, inputs), generate(again, inputs))


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16(name):
    vlm = build_tiny(name, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in vlm.model.parameters())
    prompt = vlm.processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    inputs = vlm.processor(text=[prompt], images=[make_image(48, 64, seed=1)], return_tensors="pt")
    check_generated(vlm, inputs, generate(vlm, inputs))
