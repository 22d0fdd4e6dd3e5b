"""Tiny Gemma 3 and PaliGemma: image tokens, chat template, masks, padded batches, determinism per seed."""

from __future__ import annotations

import pytest
import torch

from mmattn.testing import TinyVLM, build_tiny, tiny_names, tiny_spec
from mmattn.testing.gemma import (
    GEMMA3_IMAGE_TOKENS,
    GEMMA3_LAYER_TYPES,
    GEMMA3_SLIDING_WINDOW,
    PALIGEMMA_IMAGE_TOKENS,
)
from mmattn.testing.media import random_image

MODELS = ["tiny/gemma3", "tiny/paligemma"]
ARCHITECTURES = {"tiny/gemma3": "Gemma3ForConditionalGeneration", "tiny/paligemma": "PaliGemmaForConditionalGeneration"}
IMAGE_TOKENS = {"tiny/gemma3": GEMMA3_IMAGE_TOKENS, "tiny/paligemma": PALIGEMMA_IMAGE_TOKENS}
QUESTIONS = ["What is this?", "Describe the picture in every detail, please."]


def prompt_for(name: str, processor, question: str) -> str:
    """Gemma 3: its chat template; PaliGemma: a plain task prompt."""
    if name == "tiny/paligemma":
        return f"<image>answer en {question}"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def consumed_token_counts(vlm: TinyVLM, inputs) -> list[int]:
    """Image-feature rows per image, as the model computes them (one image per sample here)."""
    with torch.no_grad():
        features = vlm.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    assert features.shape[-1] == vlm.model.config.text_config.hidden_size
    return [features.shape[1]] * features.shape[0]


@pytest.fixture(scope="module", params=MODELS)
def name(request):
    return request.param


def test_registered():
    assert set(MODELS) <= set(tiny_names("vlm"))
    for model_name in MODELS:
        assert tiny_spec(model_name).architecture == ARCHITECTURES[model_name]


def test_model_and_processor(name, vlm, checks):
    model, processor = vlm.model, vlm.processor
    tokenizer = processor.tokenizer
    config = model.config
    checks.assert_ready(name, vlm)
    assert type(model).__name__ == ARCHITECTURES[name]
    assert config.vision_config.model_type == "siglip_vision_model"

    # the config's placeholder id is the one the processor expands to (Gemma 3 expands <start_of_image>)
    assert config.image_token_id == config.image_token_index
    if name == "tiny/gemma3":
        assert processor.image_token_ids == [config.image_token_id]
    else:
        assert processor.image_token_id == config.image_token_id
    assert config.image_token_id == tokenizer.image_token_id
    assert config.image_token_id != tokenizer.unk_token_id

    text, vision = config.text_config, config.vision_config
    assert text.vocab_size == len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    assert 32 <= text.hidden_size <= 64 and 2 <= text.num_hidden_layers <= 3
    assert text.num_attention_heads >= 2 and text.num_key_value_heads < text.num_attention_heads
    assert 1 <= vision.num_hidden_layers <= 2 and vision.num_attention_heads >= 2
    assert sum(p.numel() for p in model.parameters()) < 1_000_000

    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<bos>" and tokenizer.eos_token == "<eos>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.bos_token_id == tokenizer.bos_token_id
    eos = model.generation_config.eos_token_id
    assert tokenizer.eos_token_id in (eos if isinstance(eos, list) else [eos])


def test_tokenizer_round_trip(vlm):
    tokenizer = vlm.processor.tokenizer
    text = "What is this?\n\n  Ünïcødé, 漢字 & <b>tags</b>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_gemma3_config():
    vlm = build_tiny("tiny/gemma3")
    config, tokenizer = vlm.model.config, vlm.processor.tokenizer
    text = config.text_config
    assert tuple(text.layer_types) == GEMMA3_LAYER_TYPES
    assert {"sliding_attention", "full_attention"} == set(text.layer_types)
    assert text.sliding_window == GEMMA3_SLIDING_WINDOW
    assert config.mm_tokens_per_image == GEMMA3_IMAGE_TOKENS == vlm.processor.image_seq_length
    assert config.boi_token_id == tokenizer.convert_tokens_to_ids("<start_of_image>") == tokenizer.boi_token_id
    assert config.eoi_token_id == tokenizer.convert_tokens_to_ids("<end_of_image>") == tokenizer.eoi_token_id
    assert tokenizer.image_token == "<image_soft_token>"
    # generation stops at the end of the model's turn, as with the released checkpoints
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert vlm.model.generation_config.eos_token_id == [tokenizer.eos_token_id, end_of_turn]


def test_gemma3_chat_template():
    processor = build_tiny("tiny/gemma3").processor
    prompt = prompt_for("tiny/gemma3", processor, "What is this?")
    assert prompt == "<start_of_turn>user\n<start_of_image>What is this?<end_of_turn>\n<start_of_turn>model\n"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": [{"type": "text", "text": "hi there"}]},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]},
    ]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<start_of_turn>user\nBe brief.\n\nhello<end_of_turn>\n<start_of_turn>model\nhi there<end_of_turn>\n"
        "<start_of_turn>user\nLook:<start_of_image><end_of_turn>\n<start_of_turn>model\n"
    )
    # one <bos> whichever way the prompt is tokenized
    image = random_image(40, 30)
    inputs = processor(text=[prompt], images=[[image]], return_tensors="pt")
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]
    tokenized = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(tokenized["input_ids"], inputs["input_ids"])
    ids = inputs["input_ids"][0].tolist()
    assert ids[0] == processor.tokenizer.bos_token_id and ids.count(processor.tokenizer.bos_token_id) == 1


def test_gemma3_image_span():
    vlm = build_tiny("tiny/gemma3")
    processor = vlm.processor
    tokenizer = processor.tokenizer
    inputs = processor(
        text=[prompt_for("tiny/gemma3", processor, "What is this?")], images=[[random_image(80, 40)]], return_tensors="pt"
    )
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    start = tokens.index("<start_of_image>") + 1
    assert tokens[start : start + GEMMA3_IMAGE_TOKENS] == ["<image_soft_token>"] * GEMMA3_IMAGE_TOKENS
    assert tokens[start + GEMMA3_IMAGE_TOKENS] == "<end_of_image>"
    # token_type_ids mark the image tokens (attended bidirectionally)
    assert torch.equal(inputs["token_type_ids"].bool(), inputs["input_ids"] == vlm.model.config.image_token_id)
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 32, 32)


def test_gemma3_layer_type_masks():
    """Sliding and full layers see different masks: the sliding ones forget what is past the window."""
    vlm = build_tiny("tiny/gemma3")
    model, processor = vlm.model, vlm.processor
    inputs = processor(
        text=[prompt_for("tiny/gemma3", processor, "What is this?")], images=[[random_image(40, 40)]], return_tensors="pt"
    )
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault(module.self_attn.layer_type, kwargs["attention_mask"])

    handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in model.model.language_model.layers]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert set(seen) == {"sliding_attention", "full_attention"}
    full, sliding = seen["full_attention"], seen["sliding_attention"]
    assert full.shape == sliding.shape and full.dtype == torch.bool
    last_row_full, last_row_sliding = full[0, 0, -1], sliding[0, 0, -1]
    assert int(last_row_full.sum()) == inputs["input_ids"].shape[1]
    assert int(last_row_sliding.sum()) == GEMMA3_SLIDING_WINDOW


def test_paligemma_prompts():
    vlm = build_tiny("tiny/paligemma")
    processor, config = vlm.processor, vlm.model.config
    tokenizer = processor.tokenizer
    image = random_image(80, 40)
    with_placeholder = processor(text=["<image>answer en What is this?"], images=[image], return_tensors="pt")
    plain = processor(text=["answer en What is this?"], images=[image], return_tensors="pt")
    assert torch.equal(with_placeholder["input_ids"], plain["input_ids"])
    tokens = tokenizer.convert_ids_to_tokens(plain["input_ids"][0].tolist())
    # <image>*16, <bos>, the prompt, "\n": the image opens the prefix
    assert tokens[:PALIGEMMA_IMAGE_TOKENS] == ["<image>"] * PALIGEMMA_IMAGE_TOKENS
    assert tokens[PALIGEMMA_IMAGE_TOKENS] == "<bos>" and tokens[-1] == "\n"
    assert tokens.count("<bos>") == 1
    assert tokenizer.decode(plain["input_ids"][0, PALIGEMMA_IMAGE_TOKENS + 1 :]) == "answer en What is this?\n"
    # the whole prompt is prefix (token type 0), attended bidirectionally
    assert (plain["token_type_ids"] == 0).all()
    assert config.text_config.use_bidirectional_attention
    assert config.text_config.num_image_tokens == PALIGEMMA_IMAGE_TOKENS
    # location and segmentation tokens are in the vocabulary, as in PaliGemma
    assert tokenizer.convert_tokens_to_ids("<loc0000>") < len(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<seg127>") < config.text_config.vocab_size
    assert tuple(plain["pixel_values"].shape) == (1, 3, 32, 32)


def test_generate_batch_of_one(name, vlm, checks):
    processor = vlm.processor
    inputs = processor(
        text=[prompt_for(name, processor, QUESTIONS[0])], images=[[random_image(80, 40)]], return_tensors="pt"
    )
    assert checks.image_token_counts(vlm, inputs) == consumed_token_counts(vlm, inputs) == [IMAGE_TOKENS[name]]
    answer = checks.check_generated(vlm, inputs, checks.generate(vlm, inputs))
    assert len(answer) == 1


def test_generate_padded_batch(name, vlm, checks):
    processor = vlm.processor
    tokenizer = processor.tokenizer
    prompts = [prompt_for(name, processor, q) for q in QUESTIONS]
    images = [[random_image(80, 40, seed=1)], [random_image(50, 50, seed=2)]]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    assert checks.image_token_counts(vlm, inputs) == consumed_token_counts(vlm, inputs) == [IMAGE_TOKENS[name]] * 2
    pads = checks.left_padding(inputs, tokenizer.pad_token_id)
    assert pads[0] != pads[1]

    answers = checks.check_generated(vlm, inputs, checks.generate(vlm, inputs))
    assert len(answers) == 2

    # left padding does not change a sample's next-token logits
    checks.assert_padding_invariant(vlm, inputs, prompts, images)


def test_deterministic_per_seed(name, checks):
    def make_inputs(processor):
        prompts = [prompt_for(name, processor, q) for q in QUESTIONS]
        images = [[random_image(80, 40)], [random_image(40, 80)]]
        return processor(text=prompts, images=images, padding=True, return_tensors="pt")

    checks.assert_seeded(name, make_inputs)


def test_dtype(name, checks):
    def make_inputs(processor):
        return processor(text=[prompt_for(name, processor, "What?")], images=[[random_image(40, 40)]], return_tensors="pt")

    checks.assert_bfloat16(name, make_inputs)
