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


def reference_generate(model, inputs, reference, hooks=()):
    """generate() with the text model on the eager ``reference`` attention; ``hooks`` (handles) removed after."""
    AttentionInterface.register(REFERENCE, reference)
    AttentionMaskInterface.register(REFERENCE, eager_mask)
    model.set_attn_implementation({"text_config": REFERENCE})
    try:
        return generate(model, inputs)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
        for hook in hooks:
            hook.remove()


def assert_rows_alone(batch, singles):
    """Each row of a batched generate() equals that sample generated alone, at every step."""
    for i, single in enumerate(singles):
        for step_batch, step_single in zip(batch.logits, single.logits):
            torch.testing.assert_close(step_single[0], step_batch[i], atol=2e-5, rtol=1e-4)


def assert_matches(ours, want, baseline):
    """Ours equals the reference at the prefill's last row and every decode step, and differs from baseline."""
    for got, expected in zip(ours.logits, want.logits):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ours.logits[0], baseline.logits[0], atol=1e-4)


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
    assert_rows_alone(both, singles)
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


def visual_ids(model) -> torch.Tensor:
    """The image (and video) token ids: what the sink methods count as visual tokens."""
    ids = [model.config.image_token_id, getattr(model.config, "video_token_id", None)]
    return torch.tensor([i for i in ids if i is not None])


class VARReference:
    """Eager attention with VAR written from the official code's rule (seilk/VisAttnSink): sinks from the layer
    input at prefill (phi = max over dims of |x| * rsqrt(mean(x^2) + 1e-6) > tau), image-centric (head, row)s among
    the rows after the image, sinks x p after softmax and the budget spread over the image's non-sink columns."""

    def __init__(self, model, config):
        self.config, self.image_ids = config, visual_ids(model)
        self.sinks, self.image, self.padding, self.prefill = {}, None, None, True

    def capture(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.prefill = cache is None or cache.get_seq_length() == 0
        if self.prefill:
            self.image = torch.isin(kwargs["input_ids"], self.image_ids)
            self.padding = kwargs.get("attention_mask")

    def layer_hook(self, index):
        def hook(module, args, kwargs):
            if self.prefill:
                x = (args[0] if args else kwargs["hidden_states"]).float()
                r = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()
                phi = r[..., list(self.config.sink_dims)].amax(-1)
                real = torch.ones_like(phi, dtype=torch.bool) if self.padding is None else self.padding.bool()
                self.sinks[index] = (phi > self.config.tau) & real
        return hook

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(-1, -2) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        probs = torch.softmax(scores.float(), dim=-1)
        index, c = module.layer_idx, self.config
        if index >= c.first_layer:
            n_keys = key.shape[2]
            pad = torch.zeros(probs.shape[0], n_keys - self.image.shape[1], dtype=torch.bool)
            sink, image = torch.cat([self.sinks[index], pad], 1), torch.cat([self.image, pad], 1)
            for b in range(probs.shape[0]):
                vis, txt = sink[b] & image[b], sink[b] & ~image[b]
                if not vis.any():
                    continue
                first_row = int(image[b].nonzero().max()) + 1 if self.prefill else 0
                a = probs[b, :, first_row:] if self.prefill else probs[b]
                orig = a.clone()
                portion = orig[..., vis].sum(-1) / (orig[..., image[b]] + 1e-6).sum(-1)
                chosen = (portion <= c.rho) & (orig[..., image[b]].sum(-1) >= c.image_mass)
                budget = (1 - c.p) * (orig[..., vis].sum(-1) + orig[..., txt].sum(-1))
                ratios = torch.where(vis, 0.0, orig) * image[b]
                ratios = ratios / ratios.sum(-1, keepdim=True)
                new = orig.clone()
                new[..., sink[b]] *= c.p
                new = new + budget[..., None] * ratios
                a[chosen] = new[chosen]
        probs = probs.to(query.dtype)
        return (probs @ value).transpose(1, 2).contiguous(), probs


def var_reference(model, config):
    """(VARReference, its hooks: the capture on the core and the sink finder on every decoder layer)."""
    reference = VARReference(model, config)
    hooks = [model.model.register_forward_pre_hook(reference.capture, with_kwargs=True)]
    hooks += [layer.register_forward_pre_hook(reference.layer_hook(i), with_kwargs=True)
              for i, layer in enumerate(model.model.language_model.layers)]
    return reference, hooks


VAR_TEST = dict(p=0.3, rho=0.9, image_mass=0.05, tau=1.2, sink_dims=(0, 3, 5), first_layer=1)


@pytest.mark.parametrize("name", ["tiny/llava", "tiny/qwen2-vl"])
def test_var_equals_the_eager_reference_prefill_and_decode(name):
    from mmattn.processors.sinks import last_sink_stats

    vlm = build_tiny(name)
    model = vlm.model
    inputs = encode(vlm, QUESTIONS)  # a padded batch of two
    config = mmattn.VAR(**VAR_TEST)
    baseline = generate(model, inputs)
    with mmattn.apply(model, config):
        ours = generate(model, inputs)
        stats = last_sink_stats(model)
    reference, hooks = var_reference(model, config)
    assert_matches(ours, reference_generate(model, inputs, reference, hooks), baseline)
    assert any(reference.sinks[1][b][inputs["input_ids"][b] == model.config.image_token_id].any() for b in range(2))
    assert stats.layers and stats.layers[0].visual_sinks > 0 and stats.layers[0].rows > 0


def test_var_p_one_is_the_unmodified_model_and_remove_restores():
    vlm = build_tiny("tiny/llava")
    inputs = encode(vlm, QUESTIONS)
    with torch.no_grad():
        before = vlm.model(**inputs).logits
        with mmattn.apply(vlm.model, mmattn.VAR(**{**VAR_TEST, "p": 1.0})):
            same = vlm.model(**inputs).logits
        with mmattn.apply(vlm.model, mmattn.VAR(**VAR_TEST)):
            changed = vlm.model(**inputs).logits
        after = vlm.model(**inputs).logits
    assert torch.equal(same, before) and torch.equal(after, before)
    assert not torch.allclose(changed, before, atol=1e-4)


@pytest.mark.parametrize("other", [FastV(layer=1, keep=0.5), ZeroTuning(heads="layers.1:*", gamma=3.0)])
def test_var_combined_in_a_padded_batch_equals_each_row_alone(other):
    vlm = build_tiny("tiny/llava")
    model = vlm.model
    batch = encode(vlm, QUESTIONS)
    methods = [other, mmattn.VAR(**VAR_TEST)]
    with mmattn.apply(model, methods):
        both = generate(model, batch)
        singles = [generate(model, encode(vlm, [q], [i])) for i, q in enumerate(QUESTIONS)]
    with mmattn.apply(model, other):
        alone = generate(model, batch)
    assert_rows_alone(both, singles)
    assert not torch.allclose(both.logits[0], alone.logits[0], atol=1e-4)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_var_validation():
    with pytest.raises(ValueError, match=r"p=1.5 is out of range"):
        mmattn.VAR(p=1.5)
    with pytest.raises(ValueError, match="sink_dims="):
        mmattn.VAR(sink_dims=())
    vlm = build_tiny("tiny/llava")
    with pytest.raises(ValueError, match="first_layer=2 is out of range for LlavaForConditionalGeneration"):
        mmattn.apply(vlm.model, mmattn.VAR())


class PAIReference:
    """Eager attention with PAI's step from the official code (LALBJ/PAI): after the mask, the last row's image-key
    logits z become |z| * alpha + z, then the softmax."""

    def __init__(self, model, config):
        self.config, self.image_ids, self.image = config, visual_ids(model), None

    def capture(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or cache.get_seq_length() == 0:
            self.image = torch.isin(kwargs["input_ids"], self.image_ids)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(-1, -2) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        last = self.config.last_layer if self.config.last_layer is not None else 10 ** 6
        if self.config.first_layer <= module.layer_idx <= last:
            image = torch.cat([self.image, torch.zeros(self.image.shape[0], key.shape[2] - self.image.shape[1],
                                                       dtype=torch.bool)], 1)
            for b in range(scores.shape[0]):
                z = scores[b, :, -1, image[b]]
                scores[b, :, -1, image[b]] = z.abs() * self.config.alpha + z
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        return (probs @ value).transpose(1, 2).contiguous(), probs


@pytest.mark.parametrize("name", ["tiny/llava", "tiny/qwen2-vl"])
def test_pai_equals_the_eager_reference_prefill_and_decode(name):
    vlm = build_tiny(name)
    model = vlm.model
    inputs = encode(vlm, QUESTIONS)
    config = mmattn.PAI(alpha=0.8, first_layer=1)
    baseline = generate(model, inputs)
    with mmattn.apply(model, config):
        ours = generate(model, inputs)
    reference = PAIReference(model, config)
    hook = model.model.register_forward_pre_hook(reference.capture, with_kwargs=True)
    assert_matches(ours, reference_generate(model, inputs, reference, [hook]), baseline)


def test_pai_alpha_zero_is_the_unmodified_model_and_composes_with_fastv():
    vlm = build_tiny("tiny/llava")
    model = vlm.model
    inputs = encode(vlm, QUESTIONS)
    with torch.no_grad():
        before = model(**inputs).logits
        with mmattn.apply(model, mmattn.PAI(alpha=0.0, first_layer=0)):
            assert torch.equal(model(**inputs).logits, before)
        assert torch.equal(model(**inputs).logits, before)
    methods = [FastV(layer=1, keep=0.5), mmattn.PAI(alpha=1.0, first_layer=1)]
    with mmattn.apply(model, methods):
        both = generate(model, inputs)
        singles = [generate(model, encode(vlm, [q], [i])) for i, q in enumerate(QUESTIONS)]
    assert_rows_alone(both, singles)
    with pytest.raises(ValueError, match="last_layer=5 is out of range for LlavaForConditionalGeneration"):
        mmattn.apply(model, mmattn.PAI(first_layer=0, last_layer=5))


class ACTReference:
    """Eager attention with ACT written from the official rule (GATECH-EIC/ACT), padding-aware: per (sample,
    chosen head) in the prefill, sinks = keys whose column sum over the real rows that see them, divided by their
    number, exceeds the threshold, less the first one; every row: sinks x beta, the rest scaled to fill the row.
    Decode steps reuse the prefill's sinks."""

    def __init__(self, config, heads_by_layer):
        self.config, self.heads, self.sinks = config, heads_by_layer, {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = query @ key.transpose(-1, -2) * scaling
        visible = attention_mask[:, :, :, : key.shape[-2]] > -1e30 if attention_mask is not None else None
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        probs = torch.softmax(scores.float(), dim=-1)
        heads = self.heads.get(module.layer_idx, ())
        n_q, n_k = query.shape[2], key.shape[2]
        for b in range(probs.shape[0]):
            for h in heads:
                a = probs[b, h]
                if n_q == n_k:  # prefill
                    seen = visible[b, 0] if visible is not None else torch.ones(n_q, n_k, dtype=torch.bool).tril()
                    real = seen.any(-1)
                    mean = (a * real[:, None]).sum(0) / (seen & real[:, None]).sum(0).clamp_min(1)
                    found = (mean > self.config.threshold).nonzero().flatten()[1:]
                    self.sinks[(module.layer_idx, b, h)] = found
                found = self.sinks[(module.layer_idx, b, h)]
                freed = a[:, found].sum(-1) * (1 - self.config.beta)
                rest = a.clone()
                rest[:, found] = 0
                new = a.clone()
                new[:, found] *= self.config.beta
                new = new + freed[:, None] * rest / rest.sum(-1, keepdim=True).clamp_min(1e-30)
                probs[b, h] = new
        probs = probs.to(query.dtype)
        return (probs @ value).transpose(1, 2).contiguous(), probs


@pytest.mark.parametrize("name", ["tiny/llava", "tiny/qwen2-vl"])
def test_act_equals_the_eager_reference_prefill_and_decode(name):
    vlm = build_tiny(name)
    model = vlm.model
    inputs = encode(vlm, QUESTIONS)
    heads = model.config.text_config.num_attention_heads
    config = mmattn.ACT(heads="layers.0:0,1;layers.1:*", beta=0.3, threshold=0.02)
    baseline = generate(model, inputs)
    with mmattn.apply(model, config):
        ours = generate(model, inputs)
    reference = ACTReference(config, {0: (0, 1), 1: tuple(range(heads))})
    want = reference_generate(model, inputs, reference)
    assert any(len(v) for v in reference.sinks.values())
    assert_matches(ours, want, baseline)


def test_act_beta_one_is_the_unmodified_model_and_remove_restores():
    vlm = build_tiny("tiny/llava")
    inputs = encode(vlm, QUESTIONS)
    with torch.no_grad():
        before = vlm.model(**inputs).logits
        with mmattn.apply(vlm.model, mmattn.ACT(heads="layers.0-1:*", beta=1.0, threshold=0.02)):
            assert torch.equal(vlm.model(**inputs).logits, before)
        assert torch.equal(vlm.model(**inputs).logits, before)


class VHRReference:
    """VHR from the paper's rule, with plain hooks: text-only last-token head outputs first; in the image prefill,
    per chosen layer, VHD = ||A_img - A_txt||, zeroed where VHD and ||A_txt||^2 both exceed mean + std over the
    layer's heads, heads above the median scaled by alpha, at every position, then kept for decode."""

    def __init__(self, model, alpha, layers):
        self.model, self.alpha, self.layers = model, alpha, layers
        self.text, self.chosen, self.prefill = {}, {}, True
        self.heads = model.config.text_config.num_attention_heads

    def text_only(self, inputs):
        image = inputs["input_ids"] == self.model.config.image_token_id
        rows = [ids[keep.bool() & ~img] for ids, keep, img in zip(inputs["input_ids"], inputs["attention_mask"], image)]
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(rows):
            ids[b, length - len(r):], mask[b, length - len(r):] = r, 1
        layers = self.model.model.language_model.layers
        hooks = [layers[i].self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: self.text.__setitem__(i, a[0][:, -1].reshape(a[0].shape[0], self.heads, -1)))
            for i in self.layers]
        with torch.no_grad():
            self.model.model(input_ids=ids, attention_mask=mask, use_cache=False)
        for hook in hooks:
            hook.remove()

    def hook(self, i):
        def scale(module, args):
            x = args[0]
            heads = x.reshape(x.shape[0], x.shape[1], self.heads, -1)
            if i not in self.chosen:
                vhd = (heads[:, -1] - self.text[i]).norm(dim=-1)
                ta = self.text[i].pow(2).sum(-1)
                out = (vhd > vhd.mean(1, keepdim=True) + vhd.std(1, keepdim=True)) & \
                    (ta > ta.mean(1, keepdim=True) + ta.std(1, keepdim=True))
                vhd = vhd.masked_fill(out, 0.0)
                self.chosen[i] = vhd > vhd.median(1, keepdim=True).values
            factor = 1 + (self.alpha - 1) * self.chosen[i].float()
            return ((heads * factor[:, None, :, None]).reshape(x.shape),)
        return scale


@pytest.mark.parametrize("name", ["tiny/llava", "tiny/qwen2-vl"])
def test_vhr_equals_the_reference_prefill_and_decode(name):
    vlm = build_tiny(name)
    model = vlm.model
    inputs = encode(vlm, QUESTIONS)
    config = mmattn.VHR(alpha=3.0, layers=(0, 1))
    baseline = generate(model, inputs)
    with mmattn.apply(model, config):
        ours = generate(model, inputs)
    reference = VHRReference(model, 3.0, (0, 1))
    reference.text_only(inputs)
    layers = model.model.language_model.layers
    hooks = [layers[i].self_attn.o_proj.register_forward_pre_hook(reference.hook(i)) for i in (0, 1)]
    try:
        want = generate(model, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert all(c.any() and not c.all() for c in reference.chosen.values())
    for got, expected in zip(ours.logits, want.logits):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(ours.logits[0], baseline.logits[0], atol=1e-4)


def test_vhr_alpha_one_is_the_unmodified_model_and_composes_with_var():
    vlm = build_tiny("tiny/llava")
    model = vlm.model
    inputs = encode(vlm, QUESTIONS)
    with torch.no_grad():
        before = model(**inputs).logits
        with mmattn.apply(model, mmattn.VHR(alpha=1.0)):
            assert torch.equal(model(**inputs).logits, before)
        assert torch.equal(model(**inputs).logits, before)
    methods = [mmattn.VAR(**VAR_TEST), mmattn.VHR(alpha=2.0)]
    with mmattn.apply(model, methods):
        both = generate(model, inputs)
        singles = [generate(model, encode(vlm, [q], [i])) for i, q in enumerate(QUESTIONS)]
    assert_rows_alone(both, singles)
    with pytest.raises(ValueError, match="has 2 layers"):
        mmattn.apply(model, mmattn.VHR(layers=(0, 5)))


def encode_visual(vlm, kind):
    """A Qwen2-VL batch: "images" (two images in the first sample, one in the second, left-padded) or "video"."""
    from mmattn.testing.media import random_video

    if kind == "video":
        chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTIONS[1]}]}]
        prompt = vlm.processor.apply_chat_template(chat, add_generation_prompt=True)
        return dict(vlm.processor(text=[prompt], videos=[random_video(4, 64, 48, seed=3)], return_tensors="pt"))
    chats = [[{"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": q}]}]
             for n, q in zip((2, 1), QUESTIONS)]
    prompts = [vlm.processor.apply_chat_template(c, add_generation_prompt=True) for c in chats]
    return dict(vlm.processor(text=prompts, images=[image(5), image(6), image(7)], padding=True, return_tensors="pt"))


@pytest.mark.parametrize("kind", ["images", "video"])
@pytest.mark.parametrize("method", ["var", "pai"])
def test_sink_methods_on_several_images_and_on_video_equal_the_reference(method, kind):
    """VAR and PAI count every image of a prompt, and video frames, as its visual tokens (Qwen2-VL)."""
    vlm = build_tiny("tiny/qwen2-vl")
    model = vlm.model
    inputs = encode_visual(vlm, kind)
    visual = torch.isin(inputs["input_ids"], visual_ids(model))
    if kind == "video":
        assert visual.any() and not (inputs["input_ids"] == model.config.image_token_id).any()
    else:
        assert (inputs["attention_mask"] == 0).any() and visual[0].sum() > visual[1].sum()
    config = mmattn.VAR(**VAR_TEST) if method == "var" else mmattn.PAI(alpha=0.8, first_layer=1)
    baseline = generate(model, inputs)
    with mmattn.apply(model, config):
        ours = generate(model, inputs)
    if method == "var":
        reference, hooks = var_reference(model, config)
    else:
        reference = PAIReference(model, config)
        hooks = [model.model.register_forward_pre_hook(reference.capture, with_kwargs=True)]
    assert_matches(ours, reference_generate(model, inputs, reference, hooks), baseline)
