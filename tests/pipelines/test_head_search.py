"""HeadHunter search on the tiny SD3: greedy choice, resume from checkpoint, spec usable by SoftPAG."""

import json
import re

import pytest
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

import mmattn
from mmattn.pipelines.head_search import CLIPScore, HeadSearch, colorfulness, heads_to_spec, sharpness
from mmattn.testing import build_tiny, tiny_spec
from mmattn.testing.tokenizers import clip_tokenizer


@pytest.fixture(scope="module")
def sd3():
    return build_tiny("tiny/sd3")


def search(pipe, objective="sharpness", **kwargs):
    settings = dict(prompts=["a fox", "a car"], seeds=[0], rounds=2, top_k=2, layers="transformer_blocks.1-2:*",
                    call_kwargs=tiny_spec("tiny/sd3").defaults, progress=False) | kwargs
    return HeadSearch(pipe, objective, **settings)


@pytest.mark.slow
def test_greedy_rounds_keep_the_top_k(sd3):
    hs = search(sd3)
    result = hs.run()
    first, second = result.rounds
    assert len(first) == 8 and len(second) == 6
    top = sorted(first, key=first.get, reverse=True)[:2]
    assert [f"{l}:{h}" for l, h in result.chosen[:2]] == top
    assert [f"{l}:{h}" for l, h in result.chosen[2:]] == sorted(second, key=second.get, reverse=True)[:2]
    # scores are what score() gives for chosen-so-far + candidate
    layer, head = result.chosen[0]
    assert first[f"{layer}:{head}"] == pytest.approx(hs.score([(layer, head)]), rel=1e-6)
    assert result.baseline == pytest.approx(hs.score([]), rel=1e-6)
    # the spec is accepted by SoftPAG directly
    with mmattn.apply(sd3, mmattn.SoftPAG(heads=result.spec)):
        pass


@pytest.mark.slow
def test_resume_from_checkpoint(sd3, tmp_path):
    path = tmp_path / "ckpt.json"
    calls = {"n": 0}

    def flaky(images, prompts):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return sharpness(images, prompts)

    flaky.__name__ = "sharpness"
    with pytest.raises(KeyboardInterrupt):
        search(sd3, flaky, checkpoint=path).run()
    saved = json.loads(path.read_text())
    assert saved["baseline"] is not None and len(saved["rounds"][0]) == 4

    counted = {"n": 0}

    def counting(images, prompts):
        counted["n"] += 1
        return sharpness(images, prompts)

    counting.__name__ = "sharpness"
    resumed = search(sd3, counting, checkpoint=path).run()
    assert counted["n"] == (8 - 4) + 6  # only the unscored candidates of round 1, then round 2
    assert resumed.chosen == search(sd3).run().chosen

    with pytest.raises(ValueError, match="written with other settings"):
        search(sd3, checkpoint=path, top_k=1).run()


def test_bad_settings_fail_clearly(sd3):
    with pytest.raises(ValueError, match="objective='psnr'"):
        search(sd3, "psnr")
    with pytest.raises(ValueError, match=r"rounds\*top_k=20 exceeds the 8 candidate heads"):
        search(sd3, rounds=10)
    with pytest.raises(ValueError, match="valid layers"):
        search(sd3, layers="transformer_blocks.9")


def test_objectives_on_known_images():
    flat = torch.full((2, 3, 16, 16), 0.5)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float().expand(2, 3, 16, 16)
    assert torch.all(sharpness(flat, ["", ""]) == 0) and torch.all(sharpness(checker, ["", ""]) > 1)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    assert colorfulness(red, [""]) > colorfulness(flat[:1], [""]) == 0


def test_clip_score_objective_with_a_tiny_clip():
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                           image_size=32, patch_size=8), projection_dim=16)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=clip_tokenizer())
    score = CLIPScore(CLIPModel(config), processor)
    images = torch.rand(2, 3, 40, 40)
    s = score(images, ["a fox", "a car"])
    assert s.shape == (2,) and torch.all(s.abs() <= 1)


def test_heads_to_spec_groups_by_layer():
    assert heads_to_spec([("b.2", 3), ("b.1", 0), ("b.2", 1)]) == "b.2:1,3; b.1:0"


@pytest.mark.slow
@pytest.mark.parametrize("name, layers", [("tiny/sd", "mid_block.attentions.0.transformer_blocks.0"),
                                          ("tiny/flux", "single_transformer_blocks.0"), ("tiny/wan", "blocks.1")])
def test_search_runs_on_other_families(name, layers):
    pipe = build_tiny(name)
    result = HeadSearch(pipe, "colorfulness", ["a fox"], rounds=1, top_k=1, layers=f"{layers}:*",
                        call_kwargs=tiny_spec(name).defaults, progress=False).run()
    assert len(result.chosen) == 1 and result.chosen[0][0] == layers and len(result.rounds[0]) == 4


def test_a_nan_score_names_the_objective_prompt_and_seed(sd3):
    def half_nan(images, prompts):
        scores = sharpness(images, prompts)
        scores[2] = float("nan")  # pairs: (a fox, 0), (a fox, 5), (a car, 0), (a car, 5)
        return scores

    hs = search(sd3, half_nan, seeds=[0, 5], call_kwargs=tiny_spec("tiny/sd3").defaults | {"num_inference_steps": 1})
    with pytest.raises(ValueError, match=r"objective 'half_nan' returned NaN for prompt 'a car', seed 0 \(heads: none\)"):
        hs.run()


@pytest.mark.parametrize("text", ['{"settings": {"prompts": ["a f', "[]", b"\xff\xfe"])
def test_a_broken_checkpoint_names_the_file(sd3, tmp_path, text):
    path = tmp_path / "checkpoint.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=f"checkpoint {re.escape(str(path))} is not .*; delete it to start the search afresh"):
        search(sd3, checkpoint=path).run()


def test_an_offline_clip_objective_names_the_id():
    from mmattn.hub import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError, match=r"model 'someone/no-clip' is not available offline \(HF_HUB_OFFLINE=1\)"):
        CLIPScore.from_pretrained("someone/no-clip")
