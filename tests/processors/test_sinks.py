"""ZeroTuning (arXiv 2505.11739), the first modifier op of the shared text attention: against an eager reference
written here from the rule (log γ added to the initial token's logit on the chosen heads), in the prefill and in
decode steps, in padded batches, γ = 1 as identity, and together with FastV."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

import mmattn
from mmattn import FastV, ZeroTuning
from mmattn._compat import AttentionInterface, AttentionMaskInterface, eager_mask
from mmattn.testing import build_tiny

REFERENCE = "zerotuning_reference"
QUESTIONS = ["What is this?", "Describe every object in this picture, in detail."]


def image(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8))


def encode(vlm, questions, seeds=None):
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    prompts = [vlm.processor.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    images = [image(i) for i in (seeds or range(len(questions)))]
    return dict(vlm.processor(text=prompts, images=images, padding=True, return_tensors="pt"))


class Reference:
    """Eager attention with log γ added, on the chosen heads of the chosen layers, to the logit of each sample's
    first non-padding token (its position in the full, unpruned sequence: cache index = position)."""

    def __init__(self, gamma, heads_by_layer):
        self.gamma, self.heads, self.first = gamma, heads_by_layer, None

    def capture(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None or self.first is None:
            ids = kwargs["input_ids"]
            self.first = (mask.int().argmax(dim=1) if mask is not None
                          else torch.zeros(ids.shape[0], dtype=torch.long))

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        heads = self.heads.get(module.layer_idx)
        if heads:
            bonus = torch.zeros_like(scores)
            for b, column in enumerate(self.first.tolist()):
                bonus[b, list(heads), :, column] = math.log(self.gamma)
            scores = scores + bonus
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        return (probs @ value).transpose(1, 2).contiguous(), probs


def generate(model, inputs, tokens=4):
    return model.generate(**inputs, max_new_tokens=tokens, do_sample=False, return_dict_in_generate=True,
                          output_logits=True)


@pytest.mark.parametrize("name", ["tiny/llava", "tiny/qwen2-vl"])
@pytest.mark.parametrize("gamma", [0.2, 4.0])
def test_zerotuning_equals_the_eager_reference_prefill_and_decode(name, gamma):
    vlm = build_tiny(name)
    model = vlm.model
    inputs = encode(vlm, QUESTIONS)  # a padded batch of two
    assert (inputs["attention_mask"] == 0).any()
    config = ZeroTuning(heads="layers.0:0,2;layers.1:*", gamma=gamma)
    reference = Reference(gamma, {0: (0, 2), 1: tuple(range(model.config.text_config.num_attention_heads))})
    AttentionInterface.register(REFERENCE, reference)
    AttentionMaskInterface.register(REFERENCE, eager_mask)
    baseline = generate(model, inputs)
    with mmattn.apply(model, config):
        ours = generate(model, inputs)
    hook = model.model.register_forward_pre_hook(reference.capture, with_kwargs=True)
    model.set_attn_implementation({"text_config": REFERENCE})
    try:
        want = generate(model, inputs)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
        hook.remove()
    for got, expected in zip(ours.logits, want.logits):  # prefill's last row, then each decode step
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(ours.sequences, want.sequences)
    assert not torch.allclose(ours.logits[0], baseline.logits[0], atol=1e-4)


def test_gamma_one_is_the_unmodified_model_and_remove_restores():
    vlm = build_tiny("tiny/llava")
    inputs = encode(vlm, QUESTIONS)
    with torch.no_grad():
        before = vlm.model(**inputs).logits
        with mmattn.apply(vlm.model, ZeroTuning(heads="layers.0-1:*", gamma=1.0)):
            same = vlm.model(**inputs).logits
        with mmattn.apply(vlm.model, ZeroTuning(heads="layers.0-1:*", gamma=3.0)):
            changed = vlm.model(**inputs).logits
        after = vlm.model(**inputs).logits
    assert torch.equal(same, before) and torch.equal(after, before)
    assert not torch.allclose(changed, before, atol=1e-4)
    assert vlm.model.config.text_config._attn_implementation == "sdpa"


def test_zerotuning_with_fastv_in_a_padded_batch_equals_each_row_alone():
    vlm = build_tiny("tiny/llava")
    model = vlm.model
    batch = encode(vlm, QUESTIONS)
    methods = [FastV(layer=1, keep=0.5), ZeroTuning(heads="layers.1:*", gamma=3.0)]
    with mmattn.apply(model, methods):
        both = generate(model, batch)
        singles = [generate(model, encode(vlm, [q], [i])) for i, q in enumerate(QUESTIONS)]
        assert model.config.text_config._attn_implementation == mmattn.processors.pruning.IMPLEMENTATION
    with mmattn.apply(model, methods[0]):
        fastv = generate(model, batch)
    for i, single in enumerate(singles):
        for step_batch, step_single in zip(both.logits, single.logits):
            torch.testing.assert_close(step_single[0], step_batch[i], atol=2e-5, rtol=1e-4)
    assert not torch.allclose(both.logits[0], fastv.logits[0], atol=1e-4)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_zerotuning_validation_and_refusals():
    with pytest.raises(ValueError, match=r"gamma=0 is out of range: expected a number in \(0, 100\]"):
        ZeroTuning(heads="layers.0", gamma=0)
    vlm = build_tiny("tiny/llava")
    with pytest.raises(ValueError, match=r"heads: no attention layer named 'layers.9'; valid layers: layers.0-1"):
        mmattn.apply(vlm.model, ZeroTuning(heads="layers.9"))
    gemma = build_tiny("tiny/gemma3")
    with pytest.raises(ValueError, match="layers.0 of Gemma3ForConditionalGeneration is a sliding-window layer"):
        mmattn.apply(gemma.model, ZeroTuning(heads="layers.0"))
    assert gemma.model.config.text_config._attn_implementation == "sdpa"
