"""Tiny SmolVLM / Idefics3: tiled image spans, chat template, padded batches, determinism per seed."""

from __future__ import annotations

import pytest
import torch

from mmattn.testing import TinyVLM, build_tiny, tiny_names, tiny_spec
from mmattn.testing.idefics import TILE, TOKENS_PER_TILE
from mmattn.testing.media import random_image

MODELS = ["tiny/smolvlm", "tiny/idefics3"]
ARCHITECTURES = {"tiny/smolvlm": "SmolVLMForConditionalGeneration", "tiny/idefics3": "Idefics3ForConditionalGeneration"}
QUESTIONS = ["What is this?", "Describe the picture in every detail, please."]


def chat_prompt(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def expected_tokens(rows: int, cols: int) -> int:
    """Image tokens of an image split into rows x cols tiles (plus the global view)."""
    return (rows * cols + 1) * TOKENS_PER_TILE if rows else TOKENS_PER_TILE


def consumed_token_counts(vlm: TinyVLM, inputs) -> list[int]:
    """Rows of image features the model scatters into each sample's image-token positions."""
    with torch.no_grad():
        features = vlm.model.get_image_features(
            pixel_values=inputs["pixel_values"], pixel_attention_mask=inputs["pixel_attention_mask"]
        ).pooler_output
    hidden = vlm.model.config.text_config.hidden_size
    assert all(f.shape[-1] == hidden for f in features)
    return [f.shape[0] for f in features]


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
    checks.assert_ready(name, vlm)
    assert type(model).__name__ == ARCHITECTURES[name]

    # the placeholder id of the config is the tokenizer's <image>, which the processor expands
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>")
    assert processor.image_token_id == model.config.image_token_id
    assert processor.image_seq_len == TOKENS_PER_TILE
    vision = model.config.vision_config
    assert TOKENS_PER_TILE == (vision.image_size // vision.patch_size) ** 2 // model.config.scale_factor**2
    for token in ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>", "<row_2_col_2>", "<end_of_utterance>"]:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id, token

    # tiny and of the family's shape: Llama LM with grouped-query attention
    text = model.config.text_config
    assert text.vocab_size == len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    assert 32 <= text.hidden_size <= 64 and 2 <= text.num_hidden_layers <= 3
    assert text.num_attention_heads >= 2 and text.num_key_value_heads < text.num_attention_heads
    assert 1 <= vision.num_hidden_layers <= 2 and vision.num_attention_heads >= 2
    assert sum(p.numel() for p in model.parameters()) < 1_000_000

    # left padding, and generation knows pad and eos
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_tokenizer_round_trip(vlm):
    tokenizer = vlm.processor.tokenizer
    text = "What is this?\n\n  Ünïcødé, 漢字 & <b>tags</b>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # no BOS is added: the chat template writes it
    assert tokenizer("hi")["input_ids"] == tokenizer("hi", add_special_tokens=False)["input_ids"]


def test_chat_template(vlm):
    prompt = chat_prompt(vlm.processor, "What is this?")
    assert prompt == "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:"
    assert vlm.processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True,
        tokenize=False,
    ) == prompt
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": [{"type": "text", "text": "hi there"}]},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]},
    ]
    assert vlm.processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<|im_start|>User: hello<end_of_utterance>\nAssistant: hi there<end_of_utterance>\n"
        "User: Look:<image><end_of_utterance>\nAssistant:"
    )


@pytest.mark.parametrize(
    "size, rows, cols",
    [((80, 40), 1, 2), ((30, 70), 2, 1), ((50, 50), 2, 2), ((2 * TILE, TILE), 1, 2)],
    ids=["wide", "tall", "square", "exact"],
)
def test_image_split_into_tiles(vlm, size, rows, cols, checks):
    processor = vlm.processor
    tokenizer = processor.tokenizer
    inputs = processor(text=[chat_prompt(processor, "What is this?")], images=[[random_image(*size)]], return_tensors="pt")
    tiles = rows * cols + 1
    assert tuple(inputs["pixel_values"].shape) == (1, tiles, 3, TILE, TILE)
    assert checks.image_token_counts(vlm, inputs) == [expected_tokens(rows, cols)]
    assert consumed_token_counts(vlm, inputs) == [expected_tokens(rows, cols)]
    tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].tolist())
    # one <fake_token_around_image> opens each tile, one closes the global view
    assert tokens.count("<fake_token_around_image>") == tiles + 1
    assert tokens.count("<global-img>") == 1
    grid = [f"<row_{r}_col_{c}>" for r in range(1, rows + 1) for c in range(1, cols + 1)]
    assert [t for t in tokens if t.startswith("<row_")] == grid
    # each tile's span: separator, tag, TOKENS_PER_TILE image tokens
    for tag in grid + ["<global-img>"]:
        start = tokens.index(tag) + 1
        assert tokens[start - 2] == "<fake_token_around_image>"
        assert tokens[start : start + TOKENS_PER_TILE] == ["<image>"] * TOKENS_PER_TILE
        assert tokens[start + TOKENS_PER_TILE] != "<image>"


def test_generate_batch_of_one(vlm, checks):
    processor = vlm.processor
    inputs = processor(
        text=[chat_prompt(processor, QUESTIONS[0])], images=[[random_image(80, 40)]], return_tensors="pt"
    )
    assert checks.image_token_counts(vlm, inputs) == consumed_token_counts(vlm, inputs) == [expected_tokens(1, 2)]
    answer = checks.check_generated(vlm, inputs, checks.generate(vlm, inputs), exact_length=True)
    assert len(answer) == 1


def test_generate_padded_batch(vlm, checks):
    processor = vlm.processor
    tokenizer = processor.tokenizer
    prompts = [chat_prompt(processor, q) for q in QUESTIONS]
    images = [[random_image(80, 40, seed=1)], [random_image(50, 50, seed=2)]]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    counts = [expected_tokens(1, 2), expected_tokens(2, 2)]
    assert checks.image_token_counts(vlm, inputs) == consumed_token_counts(vlm, inputs) == counts
    # pixel_values pad the first sample's 3 tiles to the second one's 5 with all-zero tiles
    assert tuple(inputs["pixel_values"].shape) == (2, 5, 3, TILE, TILE)
    # the prompts differ in length: the shorter one is padded on the left
    pads = checks.left_padding(inputs, tokenizer.pad_token_id)
    assert pads[0] != pads[1]
    short = pads.index(max(pads))
    pad = pads[short]
    assert inputs["input_ids"][short, pad] == tokenizer.bos_token_id

    answers = checks.check_generated(vlm, inputs, checks.generate(vlm, inputs), exact_length=True)
    assert len(answers) == 2

    # left padding does not change a sample's next-token logits
    checks.assert_padding_invariant(vlm, inputs, prompts, images)


def test_deterministic_per_seed(name, checks):
    def make_inputs(processor):
        prompts = [chat_prompt(processor, q) for q in QUESTIONS]
        images = [[random_image(80, 40)], [random_image(40, 80)]]
        return processor(text=prompts, images=images, padding=True, return_tensors="pt")

    checks.assert_seeded(name, make_inputs)


def test_dtype(name, checks):
    def make_inputs(processor):
        return processor(text=[chat_prompt(processor, "What?")], images=[[random_image(40, 40)]], return_tensors="pt")

    checks.assert_bfloat16(name, make_inputs)


def test_smolvlm_processor_without_num2words(monkeypatch):
    """SmolVLMProcessor needs `num2words`; without it the builder falls back to Idefics3Processor,
    which writes the same image spans."""
    from transformers import Idefics3Processor

    import mmattn.testing.idefics as idefics

    usual = build_tiny("tiny/smolvlm")
    monkeypatch.setattr(idefics, "is_num2words_available", lambda: False)
    fallback = build_tiny("tiny/smolvlm")
    assert type(fallback.processor) is Idefics3Processor
    texts = [chat_prompt(usual.processor, q) for q in QUESTIONS]
    images = [[random_image(80, 40)], [random_image(50, 50)]]
    expected = usual.processor(text=texts, images=images, padding=True, return_tensors="pt")
    got = fallback.processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert chat_prompt(fallback.processor, "What is this?") == chat_prompt(usual.processor, "What is this?")
