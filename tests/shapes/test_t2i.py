"""shapes-t2i: its tokenizer, its training script (a few steps), the adherence rule, and the shipped weights."""

import json

import pytest
import torch

import mmattn
from mmattn.shapes import scenes, t2i


def test_every_word_is_one_clip_token():
    tok = t2i.tokenizer()
    for word in scenes.VOCABULARY:
        assert tok.tokenize(word) == [word + "</w>"], word
    ids = tok("a large red circle left of a blue square", padding="max_length", max_length=t2i.CLIP_LENGTH).input_ids
    assert len(ids) == t2i.CLIP_LENGTH and ids[0] == tok.bos_token_id


def test_matches_reads_the_caption():
    one = scenes.Scene((scenes.Thing("circle", "red", "large", 0, 0),), (30, 30, 30), 0.0, 0)
    assert t2i.matches(one, {("circle", "red", "large", 2, 1)})  # position is not in the caption
    assert not t2i.matches(one, {("circle", "red", "small", 0, 0)})
    assert not t2i.matches(one, {("circle", "red", "large", 0, 0), ("star", "blue", "small", 1, 1)})
    two = scenes.Scene((scenes.Thing("circle", "red", "large", 0, 1), scenes.Thing("square", "blue", "small", 2, 1)),
                       (30, 30, 30), 0.0, 0)
    assert scenes.caption(two) == "a red circle left of a blue square"
    assert t2i.matches(two, {("circle", "red", "small", 0, 0), ("square", "blue", "large", 1, 2)})
    assert not t2i.matches(two, {("circle", "red", "small", 2, 0), ("square", "blue", "large", 1, 2)})


def test_training_script_runs_a_few_steps(tmp_path, monkeypatch):
    from mmattn.shapes import classifier
    from mmattn.shapes.train import main

    monkeypatch.setattr(classifier, "load", lambda: classifier.build(seed=0))  # the script, not the scores
    assert main(["t2i", "--steps", "2", "--vae-steps", "2", "--dataset", "16", "--batch-size", "4", "--eval", "2",
                 "--out", str(tmp_path)]) == 0
    card = json.loads((tmp_path / "shapes-t2i.json").read_text())
    assert card["image_tokens"] == 64 and card["steps"] == 2 and "adherence" in card["test"]
    pipe = t2i.load(tmp_path / "shapes-t2i.safetensors")
    assert pipe.vae.config.scaling_factor == pytest.approx(card["vae_scale"])
    # two continuations: the last card lists both earlier runs, oldest first, flat, and sums the time
    small = ["--steps", "1", "--dataset", "8", "--batch-size", "2", "--eval", "2"]
    assert main(["t2i", "--init", str(tmp_path / "shapes-t2i.safetensors"), *small, "--out", str(tmp_path / "b")]) == 0
    assert main(["t2i", "--init", str(tmp_path / "b" / "shapes-t2i.safetensors"), *small, "--seed", "1",
                 "--two-objects", "1", "--out", str(tmp_path / "c")]) == 0
    last = json.loads((tmp_path / "c" / "shapes-t2i.json").read_text())
    assert "8 cached latents (100% two-object)" in last["data"]
    assert [run["steps"] for run in last["continued_from"]] == [2, 1] and last["seed"] == 1
    assert not any("continued_from" in run or "history" in run for run in last["continued_from"])
    assert "- time in all, oldest run first: " in (tmp_path / "c" / "shapes-t2i.md").read_text()


def test_training_scenes_take_the_two_object_share_asked():
    import random

    counts = lambda share: [len(s.things) for s in t2i._scenes(random.Random(0), 400, two_objects=share)]
    assert set(counts(1.0)) == {2} and set(counts(0.0)) == {1}
    assert 0.6 < counts(0.7).count(2) / 400 < 0.8
    assert 0.4 < [len(s.things) for s in t2i._scenes(random.Random(0), 400)].count(2) / 400 < 0.6
    with pytest.raises(ValueError, match=r"two_objects=1.5: expected a share in \[0, 1\]"):
        t2i.train(two_objects=1.5)


@pytest.fixture(scope="module")
def shipped():
    from mmattn.hub import load_pipeline

    return load_pipeline("mmattn/shapes-t2i")


def test_shipped_pipeline_loads_by_name(shipped):
    from diffusers import StableDiffusion3Pipeline

    from mmattn.hub import pipeline_defaults, pipeline_kind

    assert isinstance(shipped, StableDiffusion3Pipeline) and pipeline_kind("mmattn/shapes-t2i") == "image"
    assert pipeline_defaults("mmattn/shapes-t2i")["height"] == 64
    image = shipped("a red circle", generator=torch.Generator().manual_seed(0), **t2i.CALL_DEFAULTS).images[0]
    assert image.size == (64, 64)


def test_shipped_pipeline_follows_held_out_prompts(shipped):
    card = json.loads(t2i.CARD.read_text())
    scores = t2i.evaluate(shipped, "test", n=40)
    # the card, on 200 prompts: 84 % exact, 84.5 % with the captioned shapes and colours (the issue asks 80 %)
    assert scores["adherence"] >= 0.35 and scores["adherence"] >= card["test"]["adherence"] - 0.12, scores
    assert scores["shape_colour_adherence"] >= card["test"]["shape_colour_adherence"] - 0.12, (scores, card["test"])
    assert scores["colour_adherence"] >= card["test"]["colour_adherence"] - 0.15, (scores, card["test"])


def test_methods_apply_to_the_shipped_pipeline(shipped):
    call = {**t2i.CALL_DEFAULTS, "num_inference_steps": 4}
    base = shipped("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
    for config in (mmattn.SoftPAG(heads="transformer_blocks.2:*", strength=0.5),
                   mmattn.WindowAttention(mmattn.Window2D(5))):
        with mmattn.apply(shipped, config):
            out = shipped("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
        assert not torch.allclose(out, base, atol=1e-4)
    again = shipped("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
    assert torch.equal(again, base)


def test_generation_harness_writes_its_table(tmp_path, monkeypatch):
    from mmattn.shapes import classifier, evaluate

    monkeypatch.setattr(t2i, "load", lambda: t2i.build(seed=0))  # untrained: the harness, not the scores
    monkeypatch.setattr(classifier, "load", lambda: classifier.build(seed=0))
    result = evaluate.run_gen(images=3, steps=1, out=tmp_path)
    names = [r["method"] for r in result["rows"]]
    assert names[:6] == ["CFG", "PAG", "SoftPAG (searched heads)", "SoftPAG", "SEG", "SLG"]
    assert len(names) == 6 * len(evaluate.CFG_SCALES)
    assert all(0 <= r["adherence"] <= 1 and r["frechet"] >= 0 for r in result["rows"])
    table = (tmp_path / "gen.md").read_text()
    assert "| SoftPAG |" in table and json.loads((tmp_path / "gen.json").read_text())["rows"]


def test_frechet_distance_is_zero_for_the_same_features_and_grows_with_a_shift():
    from mmattn.shapes.evaluate import frechet_distance

    x = torch.randn(200, 8, dtype=torch.float64)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(x, x + 1.0) == pytest.approx(8.0, rel=1e-6)  # |mu shift|^2, covariances equal


def test_make_run_perturbs_the_searched_heads():
    """The Makefile restates SEARCHED_HEADS (make cannot import it): the two must not drift apart."""
    from pathlib import Path

    from mmattn.shapes.evaluate import SEARCHED_HEADS

    makefile = (Path(__file__).parents[2] / "Makefile").read_text()
    assert f"SEARCHED_HEADS := {SEARCHED_HEADS}\n" in makefile
