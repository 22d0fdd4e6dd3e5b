"""Config types and head specs: numbers of every kind accepted, wrong types named as such, empty specs refused."""

import warnings

import numpy as np
import torch
import pytest

import mmattn
from mmattn import SEG, SLG, STG, FastV, PyramidDrop, SoftPAG, VisionZip
from mmattn.configs import ConfigTypeError
from mmattn.heads import parse_heads
from mmattn.processors import pruning
from mmattn.testing import build_tiny
from mmattn.testing.media import question_inputs


@pytest.mark.parametrize("value", [0.5, np.float32(0.5), np.float64(0.5), np.float16(0.5)])
def test_numpy_and_python_floats_are_numbers(value):
    config = SoftPAG(heads="transformer_blocks.1", strength=value)
    assert config.strength == 0.5 and type(config.strength) is float
    assert config.to_dict()["strength"] == 0.5


@pytest.mark.parametrize("value", [2, np.int64(2), np.int32(2)])
def test_numpy_and_python_ints_are_layers_and_counts(value):
    config = FastV(layer=value, keep=value)
    assert (config.layer, config.keep) == (2, 2) and type(config.keep) is int
    assert PyramidDrop(stages=[(value, np.float32(0.5))]).stages == ((2, 0.5),)


@pytest.mark.parametrize("make, message", [
    (lambda: SoftPAG(heads="transformer_blocks.1", strength="0.5"), r"strength='0.5': expected a number, got str"),
    (lambda: SEG(heads="transformer_blocks.1", sigma=True), r"sigma=True: expected a number, got a bool"),
    (lambda: SEG(heads="transformer_blocks.1", sigma="inf"), r"sigma='inf': expected a number, got str"),
    (lambda: SLG(layers="transformer_blocks.1", scale=False), r"scale=False: expected a number, got a bool"),
    (lambda: STG(layers="transformer_blocks.1", rescale="1"), r"rescale='1': expected a number"),
    (lambda: FastV(keep="all"), r"keep='all': expected a fraction .*1.0 keeps all.* 1 keeps one token"),
    (lambda: FastV(layer="2"), r"layer='2': expected an int >= 1"),
])
def test_wrong_types_are_type_errors(make, message):
    with pytest.raises(TypeError, match=message) as error:
        make()
    assert isinstance(error.value, ConfigTypeError) and isinstance(error.value, ValueError)


@pytest.mark.parametrize("make, message", [
    (lambda: SLG(layers=None), r"^layers=None: expected a selection"),
    (lambda: STG(layers=""), r"^layers='': expected a selection"),
    (lambda: SoftPAG(heads=None), r"^heads=None: expected a selection"),
])
def test_errors_name_the_field_the_user_wrote(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("spec, message", [
    ("", "expected a selection"),
    (";", "entry 1 is empty"),
    ("transformer_blocks.1;", "entry 2 is empty"),
    ("transformer_blocks.1:", r"has an empty heads part; write 'transformer_blocks.1:\*'"),
    (":0", "names no layer"),
])
def test_empty_head_specs_are_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_heads(spec)


def test_keep_fraction_rounding_to_no_token_warns():
    vlm = build_tiny("tiny/llava")
    inputs = question_inputs(vlm.processor)
    with mmattn.apply(vlm.model, FastV(layer=1, keep=0.001)):
        with pytest.warns(UserWarning, match=r"keep=0.001 \(a fraction\) of \d+ image tokens rounds to 0"):
            vlm.model(**inputs)
    assert pruning.last_stats(vlm.model).kept_image_positions.shape[1] == 0
    with mmattn.apply(vlm.model, FastV(layer=1, keep=1)), warnings.catch_warnings():
        warnings.simplefilter("error")
        vlm.model(**inputs)  # an int keeps that many tokens: no warning
    assert pruning.last_stats(vlm.model).kept_image_positions.shape[1] == 1


def test_visionzip_keeps_numpy_counts():
    assert VisionZip(keep=np.int64(8), contextual=np.int64(2)).to_dict() == {"method": "visionzip", "keep": 8,
                                                                            "contextual": 2, "merge": "target_plus_mean",
                                                                            "positions": "original", "paper_exact": False}


@pytest.mark.parametrize("name", ["tiny/llava", "tiny/qwen2-vl", "tiny/gemma3"])
@pytest.mark.parametrize("settings, message", [
    ({"prompt_lookup_num_tokens": 3}, "does not support assisted decoding"),
    ({"cache_implementation": "static"}, r"supports the default dynamic cache only; got 'static'"),
])
def test_unsupported_generation_is_refused_before_any_work(name, settings, message):
    import inspect

    vlm = build_tiny(name)
    inputs = question_inputs(vlm.processor)
    calls = []
    hook = vlm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    signature = inspect.signature(vlm.model.generate)
    with mmattn.apply(vlm.model, FastV(layer=1, keep=1.0)):
        assert inspect.signature(vlm.model.generate) == signature
        with pytest.raises(ValueError, match=message):
            vlm.model.generate(**inputs, max_new_tokens=4, do_sample=False, **settings)
        assert calls == []
        out = vlm.model.generate(**inputs, max_new_tokens=2, do_sample=False)  # the default cache still works
    hook.remove()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 2
    assert "generate" not in vars(vlm.model)


def test_a_4d_mask_is_refused_with_what_to_pass():
    vlm = build_tiny("tiny/llava")
    inputs = question_inputs(vlm.processor)
    n = inputs["input_ids"].shape[1]
    inputs["attention_mask"] = torch.ones(1, 1, n, n, dtype=torch.bool).tril()
    with mmattn.apply(vlm.model, FastV(layer=1, keep=0.5)):
        with pytest.raises(ValueError, match=r"FastV: pruning takes a 2D attention_mask .* got a Tensor of shape "
                                             r"\(1, 1, \d+, \d+\)\. Custom 4D masks are not supported"):
            vlm.model.generate(**inputs, max_new_tokens=2)


EXAMPLES = [
    SoftPAG(heads="transformer_blocks.1:0,2", strength=0.3, scale=2.0, target="uniform", start=0.1, stop=0.9),
    mmattn.PAG(heads="transformer_blocks.0-2", scope="image"),
    SEG(heads="transformer_blocks.1:*", sigma=float("inf"), scale=4.0),
    SEG(heads="transformer_blocks.1", sigma=np.float32(2.5)),
    SLG(layers="transformer_blocks.7-9", scale=2.8),
    STG(layers="blocks.1", mode="residual", rescale=0.7),
    FastV(layer=2, keep=64), FastV(layer=3, keep=0.25),
    mmattn.SparseVLM(layer=2, keep=0.5), mmattn.DivPrune(keep=0.1, layer=1),
    VisionZip(keep=32, contextual=4), PyramidDrop(stages=[(2, 0.5), (6, 0.2)]),
    mmattn.ZeroTuning(heads="layers.0-1:*", gamma=0.5),
    mmattn.VAR(p=0.5, sink_dims=(3, 7)), mmattn.VAR(), mmattn.PAI(alpha=0.2, first_layer=1, last_layer=3),
    mmattn.ACT(heads="layers.2:0,3", beta=0.5), mmattn.VHR(alpha=3.0, layers=(1, 5)),
    mmattn.WindowAttention(mmattn.Window2D((5, 7), dilation=(1, 2)), steps=(0.2, 1.0)),
    mmattn.WindowAttention(mmattn.Radial(dense_frames=2)), mmattn.FreeSwim(training_grid=(1, 32, 32)),
]


def test_every_registered_method_has_an_example():
    from mmattn import methods

    assert sorted({config.name for config in EXAMPLES}) == methods.list_methods()
    assert methods.list_methods("vlm") == ["act", "divprune", "fastv", "pai", "pyramiddrop", "sparsevlm", "var",
                                             "vhr", "visionzip", "zerotuning"]
    assert methods.list_methods("diffusion") == ["freeswim", "pag", "seg", "slg", "softpag", "stg", "window"]
    assert methods.get("softpag") is SoftPAG


@pytest.mark.parametrize("config", EXAMPLES, ids=lambda c: c.name)
def test_from_dict_round_trips(config):
    import json

    from mmattn import methods

    data = json.loads(json.dumps(config.to_dict()))  # through JSON, as settings.json stores it
    assert methods.from_dict(data) == config


def test_from_dict_errors():
    from mmattn import methods

    with pytest.raises(KeyError, match="unknown method 'fastvv'; known methods: act, divprune, fastv"):
        methods.from_dict({"method": "fastvv"})
    with pytest.raises(ValueError, match=r"fastv: unknown settings \['ratio'\]"):
        methods.from_dict({"method": "fastv", "ratio": 0.5})
    with pytest.raises(ValueError, match="with a 'method' key"):
        methods.from_dict({"layer": 2})
