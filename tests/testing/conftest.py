"""Fixtures shared by the tiny-VLM tests.

Test modules run under ``--import-mode=importlib`` and cannot import each other or this file, so the
shared checks reach them as the ``checks`` fixture. A module that uses ``vlm`` defines ``name``.
"""

from __future__ import annotations

import pytest
import torch

from mmattn.testing import TinyVLM, build_tiny, tiny_spec

MAX_NEW_TOKENS = 4


@pytest.fixture(scope="module")
def vlm(name) -> TinyVLM:
    return build_tiny(name)


class VLMChecks:
    """Assertions every tiny VLM must pass, whatever its family."""

    max_new_tokens = MAX_NEW_TOKENS

    @staticmethod
    def generate(vlm: TinyVLM, inputs) -> torch.Tensor:
        with torch.no_grad():
            return vlm.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)

    @staticmethod
    def check_generated(vlm: TinyVLM, inputs, out: torch.Tensor, exact_length: bool = False) -> list[str]:
        """The prompt comes back unchanged, followed by 1 to MAX_NEW_TOKENS new tokens (exactly that many
        with ``exact_length``) that are no image placeholder and decode to a string per row."""
        prompt_len = inputs["input_ids"].shape[1]
        assert out.shape[0] == inputs["input_ids"].shape[0]
        if exact_length:
            assert out.shape[1] == prompt_len + MAX_NEW_TOKENS
        assert prompt_len < out.shape[1] <= prompt_len + MAX_NEW_TOKENS
        assert torch.equal(out[:, :prompt_len], inputs["input_ids"])
        assert not (out[:, prompt_len:] == vlm.model.config.image_token_id).any()
        texts = vlm.processor.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
        assert len(texts) == out.shape[0] and all(isinstance(t, str) for t in texts)
        return texts

    @classmethod
    def check_padded_batch(cls, vlm: TinyVLM, **processor_inputs) -> list[str]:
        """``processor(**processor_inputs)`` (text, images, videos...) padded to a batch that needs padding,
        then generate() and :meth:`check_generated`."""
        batch = vlm.processor(**processor_inputs, padding=True, return_tensors="pt")
        assert not batch["attention_mask"].all()
        return cls.check_generated(vlm, batch, cls.generate(vlm, batch))

    @staticmethod
    def image_token_counts(vlm: TinyVLM, inputs) -> list[int]:
        """Image placeholder tokens in each row of ``input_ids``."""
        return (inputs["input_ids"] == vlm.model.config.image_token_id).sum(dim=1).tolist()

    @staticmethod
    def left_padding(inputs, pad_token_id: int) -> list[int]:
        """Pad tokens per row, checking that each row is pad ids under a zero mask, then real tokens."""
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        pads = (mask == 0).sum(dim=1).tolist()
        for row, pad in enumerate(pads):
            assert pad < mask.shape[1]
            assert (mask[row, :pad] == 0).all() and (mask[row, pad:] == 1).all()
            assert (ids[row, :pad] == pad_token_id).all()
        return pads

    @staticmethod
    def assert_padding_invariant(vlm: TinyVLM, inputs, prompts: list[str], images: list) -> None:
        """Left padding does not change a row's next-token logits: each row of the padded batch
        ``inputs`` matches its prompt and images run alone."""
        model, processor = vlm.model, vlm.processor
        with torch.no_grad():
            batched = model(**inputs).logits[:, -1]
            for i, (prompt, image) in enumerate(zip(prompts, images, strict=True)):
                alone = processor(text=[prompt], images=[image], return_tensors="pt")
                torch.testing.assert_close(model(**alone).logits[0, -1], batched[i], atol=1e-4, rtol=1e-4)

    @classmethod
    def assert_seeded(cls, name: str, make_inputs) -> None:
        """Same seed: same weights and same generated ids for ``make_inputs(processor)``; another seed:
        other weights (input embeddings included)."""
        first, again, other = build_tiny(name, seed=0), build_tiny(name, seed=0), build_tiny(name, seed=1)
        state, state_again, state_other = (v.model.state_dict() for v in (first, again, other))
        assert state.keys() == state_again.keys() == state_other.keys()
        assert all(torch.equal(state[k], state_again[k]) for k in state)
        assert any(not torch.equal(state[k], state_other[k]) for k in state)
        embeddings = first.model.get_input_embeddings().weight, other.model.get_input_embeddings().weight
        assert not torch.equal(*embeddings)

        inputs = make_inputs(first.processor)
        assert torch.equal(cls.generate(first, inputs), cls.generate(again, inputs))

    @classmethod
    def assert_bfloat16(cls, name: str, make_inputs) -> None:
        """``dtype=torch.bfloat16`` casts the float32 weights of the same seed; the model runs and generates."""
        vlm = build_tiny(name, dtype=torch.bfloat16)
        assert {p.dtype for p in vlm.model.parameters()} == {torch.bfloat16}
        reference = build_tiny(name).model.state_dict()
        for key, value in vlm.model.state_dict().items():
            assert torch.equal(value, reference[key].to(torch.bfloat16)), key
        inputs = make_inputs(vlm.processor)
        with torch.no_grad():
            logits = vlm.model(**inputs).logits
        assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
        cls.check_generated(vlm, inputs, cls.generate(vlm, inputs))

    @staticmethod
    def assert_ready(name: str, vlm: TinyVLM) -> None:
        """The registered architecture, in eval mode, float32 on CPU, sdpa attention throughout."""
        model, config = vlm.model, vlm.model.config
        assert type(model).__name__ == tiny_spec(name).architecture
        assert not model.training
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert config._attn_implementation == "sdpa"
        assert config.text_config._attn_implementation == "sdpa"
        assert config.vision_config._attn_implementation == "sdpa"


@pytest.fixture(scope="session")
def checks() -> type[VLMChecks]:
    return VLMChecks
