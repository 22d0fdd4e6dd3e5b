"""Tiny SmolVLM / Idefics3: tiled image spans, chat template, padded batches, determinism per seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmattn.testing import TinyVLM, build_tiny, tiny_names, tiny_spec
from mmattn.testing.idefics import TILE, TOKENS_PER_TILE

MODELS = ["tiny/smolvlm", "tiny/idefics3"]
ARCHITECTURES = {"tiny/smolvlm": "SmolVLMForConditionalGeneration", "tiny/idefics3": "Idefics3ForConditionalGeneration"}
QUESTIONS = ["What is this?", "Describe the picture in every detail, please."]


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def chat_prompt(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def expected_tokens(rows: int, cols: int) -> int:
    """Image tokens of an image split into rows x cols tiles (plus the global view)."""
    return (rows * cols + 1) * TOKENS_PER_TILE if rows else TOKENS_PER_TILE


def image_token_counts(vlm: TinyVLM, inputs) -> list[int]:
    return (inputs["input_ids"] == vlm.model.config.image_token_id).sum(dim=1).tolist()


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


@pytest.fixture(scope="module")
def vlm(name) -> TinyVLM:
    return build_tiny(name)


def test_registered():
    assert set(MODELS) <= set(tiny_names("vlm"))
    for model_name in MODELS:
        assert tiny_spec(model_name).architecture == ARCHITECTURES[model_name]


def test_model_and_processor(name, vlm):
    model, processor = vlm.model, vlm.processor
    tokenizer = processor.tokenizer
    assert type(model).__name__ == ARCHITECTURES[name]
    assert not model.training
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config._attn_implementation == "sdpa"
    assert model.config.text_config._attn_implementation == "sdpa"

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
def test_image_split_into_tiles(vlm, size, rows, cols):
    processor = vlm.processor
    tokenizer = processor.tokenizer
    inputs = processor(text=[chat_prompt(processor, "What is this?")], images=[[make_image(*size)]], return_tensors="pt")
    tiles = rows * cols + 1
    assert tuple(inputs["pixel_values"].shape) == (1, tiles, 3, TILE, TILE)
    assert image_token_counts(vlm, inputs) == [expected_tokens(rows, cols)]
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


def test_generate_batch_of_one(vlm):
    model, processor = vlm.model, vlm.processor
    inputs = processor(
        text=[chat_prompt(processor, QUESTIONS[0])], images=[[make_image(80, 40)]], return_tensors="pt"
    )
    assert image_token_counts(vlm, inputs) == consumed_token_counts(vlm, inputs) == [expected_tokens(1, 2)]
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (1, prompt_len + 4)
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
    answer = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    assert len(answer) == 1 and isinstance(answer[0], str)
    assert not (out[:, prompt_len:] == model.config.image_token_id).any()


def test_generate_padded_batch(vlm):
    model, processor = vlm.model, vlm.processor
    tokenizer = processor.tokenizer
    prompts = [chat_prompt(processor, q) for q in QUESTIONS]
    images = [[make_image(80, 40, seed=1)], [make_image(50, 50, seed=2)]]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    counts = [expected_tokens(1, 2), expected_tokens(2, 2)]
    assert image_token_counts(vlm, inputs) == consumed_token_counts(vlm, inputs) == counts
    # pixel_values pad the first sample's 3 tiles to the second one's 5 with all-zero tiles
    assert tuple(inputs["pixel_values"].shape) == (2, 5, 3, TILE, TILE)
    # the prompts differ in length: the shorter one is padded on the left
    lengths = inputs["attention_mask"].sum(dim=1)
    assert lengths[0] != lengths[1]
    short = int(lengths.argmin())
    pad = inputs["input_ids"].shape[1] - int(lengths[short])
    assert (inputs["input_ids"][short, :pad] == tokenizer.pad_token_id).all()
    assert (inputs["attention_mask"][short, :pad] == 0).all()
    assert inputs["input_ids"][short, pad] == tokenizer.bos_token_id

    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (2, prompt_len + 4)
    answers = processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    # left padding does not change a sample's next-token logits
    with torch.no_grad():
        batched = model(**inputs).logits[:, -1]
        for i in range(2):
            alone = processor(text=[prompts[i]], images=[images[i]], return_tensors="pt")
            torch.testing.assert_close(model(**alone).logits[0, -1], batched[i], atol=1e-4, rtol=1e-4)


def test_deterministic_per_seed(name):
    first, again, other = build_tiny(name, seed=0), build_tiny(name, seed=0), build_tiny(name, seed=1)
    state, state_again, state_other = (v.model.state_dict() for v in (first, again, other))
    assert state.keys() == state_again.keys() == state_other.keys()
    assert all(torch.equal(state[k], state_again[k]) for k in state)
    assert any(not torch.equal(state[k], state_other[k]) for k in state)

    processor = first.processor
    inputs = processor(
        text=[chat_prompt(processor, q) for q in QUESTIONS],
        images=[[make_image(80, 40)], [make_image(40, 80)]],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = first.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        out_again = again.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, out_again)


def test_dtype(name):
    vlm = build_tiny(name, dtype=torch.bfloat16)
    assert {p.dtype for p in vlm.model.parameters()} == {torch.bfloat16}
    reference = build_tiny(name)
    for key, value in vlm.model.state_dict().items():
        assert torch.equal(value, reference.model.state_dict()[key].to(torch.bfloat16)), key
    processor = vlm.processor
    inputs = processor(text=[chat_prompt(processor, "What?")], images=[[make_image(40, 40)]], return_tensors="pt")
    with torch.no_grad():
        logits = vlm.model(**inputs).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


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
    images = [[make_image(80, 40)], [make_image(50, 50)]]
    expected = usual.processor(text=texts, images=images, padding=True, return_tensors="pt")
    got = fallback.processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert chat_prompt(fallback.processor, "What is this?") == chat_prompt(usual.processor, "What is this?")
