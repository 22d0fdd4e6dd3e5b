"""Shapes world: the generator is deterministic and fully covered by the vocabulary; shapes-vlm builds, trains a
few steps and (with its shipped weights) answers held-out questions."""

import json
import random

import pytest
import torch

from mmattn.shapes import scenes, vlm


def test_scenes_are_a_function_of_the_seed():
    a, b = scenes.scene(123), scenes.scene(123)
    assert a == b and list(scenes.render(a, 48).getdata()) == list(scenes.render(b, 48).getdata())
    assert scenes.questions(a) == scenes.questions(b) and scenes.caption(a) == scenes.caption(b)
    assert scenes.scene(124) != a


def test_splits_are_disjoint_and_named():
    train, val, test = (set(scenes.split_seeds(s, 1000)) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    with pytest.raises(ValueError, match="split='dev': expected one of train, val, test"):
        scenes.split_seeds("dev", 1)


def test_every_word_is_in_the_vocabulary_and_every_question_type_appears():
    kinds, answers = set(), set()
    for seed in range(500):
        s = scenes.scene(seed)
        assert 1 <= len(s.things) <= 4 and len({(t.column, t.row) for t in s.things}) == len(s.things)
        words = scenes.caption(s).split()
        for qa in scenes.questions(s):
            words += qa.question.split() + [qa.answer]
            kinds.add(qa.kind)
            answers.add(qa.answer)
        assert set(words) <= set(scenes.VOCABULARY)
    assert kinds == set(scenes.QUESTION_TYPES)
    assert {"yes", "no", "zero", "four", "small", "large"} <= answers


def test_answers_hold_in_the_scene():
    s = scenes.Scene((scenes.Thing("circle", "red", "large", 0, 0), scenes.Thing("square", "blue", "small", 2, 2)),
                     (40, 40, 40), 0.0, seed=7)
    assert scenes.caption(s) == "a red circle left of a blue square"
    for qa in scenes.questions(s):
        if qa.kind == "count" and qa.question == "how many shapes are there":
            assert qa.answer == "two"
        if qa.question.startswith("is the red circle"):
            relation = qa.question.removeprefix("is the red circle ").removesuffix(" the blue square")
            assert qa.answer == ("yes" if relation in ("left of", "above") else "no")


def test_shapes_vlm_has_144_image_tokens_and_learns():
    model = vlm.build(seed=0)
    rng = random.Random(0)
    inputs = vlm.conversation_batch(model.processor, rng, scenes.split_seeds("train", 100), 2)
    assert ((inputs["input_ids"] == model.processor.tokenizer.image_token_id).sum(dim=1) == 144).all()
    model.model.train()
    optimizer = torch.optim.AdamW(model.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):  # the same batch: the loss must fall
        loss = model.model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_training_script_runs_a_few_steps(tmp_path):
    from mmattn.shapes.train import main

    assert main(["vlm", "--steps", "2", "--batch-size", "2", "--eval", "12", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "shapes-vlm.safetensors").exists() and (tmp_path / "shapes-vlm.json").exists()
    assert main(["classifier", "--steps", "2", "--batch-size", "2", "--eval", "4", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "shapes-classifier.safetensors").exists()
    assert main(["vlm", "--steps", "1", "--batch-size", "2", "--eval", "6", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "shapes-vlm.json").read_text())["vision_init"] == "shapes-classifier.safetensors"


def test_vqa_harness_writes_its_table(tmp_path, monkeypatch):
    from mmattn.shapes import evaluate

    monkeypatch.setattr(vlm, "load", lambda: vlm.build(seed=0))  # untrained: the harness, not the scores
    result = evaluate.run(questions=6, out=tmp_path)
    assert [(r["method"], r["keep"]) for r in result["rows"][:2]] == [("none", 1.0), ("FastV", 0.33)]
    assert len(result["rows"]) == 1 + 5 * len(evaluate.KEEPS) + len(evaluate.sink_methods())
    assert [r["method"] for r in result["rows"][-5:]] == ["VAR", "PAI", "ACT", "VHR", "ZeroTuning"]
    table = (tmp_path / "vqa.md").read_text()
    assert "| VisionZip | 11% | 16 |" in table and json.loads((tmp_path / "vqa.json").read_text())["rows"]


def test_shipped_classifier_reads_held_out_scenes():
    from mmattn.shapes import classifier

    scores = classifier.evaluate(classifier.load(), "test", n=100)
    assert scores["scene_exact"] >= 0.97, scores


def test_shipped_vlm_loads_by_name_and_answers_held_out_questions():
    from transformers import LlavaForConditionalGeneration

    from mmattn.hub import load_vlm

    model, processor = load_vlm("mmattn/shapes-vlm")
    assert isinstance(model, LlavaForConditionalGeneration) and processor.tokenizer.image_token == "<image>"
    card = json.loads(vlm.CARD.read_text())
    scores = vlm.evaluate(vlm.TinyVLM(model, processor), "test", n=120)
    assert set(scores["per_type"]) == set(scenes.QUESTION_TYPES)
    assert scores["accuracy"] >= card["test"]["accuracy"] - 0.06, (scores, card["test"])
    assert scores["accuracy"] >= 0.85, scores  # the card: 90.3 % on 600 questions (the issue asks 90 %)


def test_adherence_objective_scores_matching_captions_high():
    """The head-search objective: renders under their own captions score near 1, under another scene's near 0."""
    import numpy as np

    from mmattn.pipelines.head_search import OBJECTIVES
    from mmattn.shapes import classifier

    items = [scenes.scene(seed, max_things=2) for seed in scenes.split_seeds("val", 8)]
    images = torch.stack([torch.from_numpy(np.asarray(scenes.render(s, 64), dtype=np.float32) / 255).permute(2, 0, 1)
                          for s in items])
    captions = [scenes.caption(s) for s in items]
    assert classifier.caption_objects("a red circle left of a blue square") == [("circle", "red"), ("square", "blue")]
    own = OBJECTIVES["adherence"](images, captions)
    other = OBJECTIVES["adherence"](images, captions[1:] + captions[:1])
    assert (own > 0.9).all() and (own > other).all() and other.mean() < 0.5, (own, other)
