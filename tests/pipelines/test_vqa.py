"""VQAPipeline on the shipped shapes-vlm: answers, batches equal single rows, pruning stats, exact restore."""

import torch

from mmattn import FastV
from mmattn.pipelines.vqa import VQAPipeline
from mmattn.shapes import scenes


def test_vqa_pipeline_answers_with_pruning_and_restores():
    rows = [(scenes.render(s, 48), qa) for seed in scenes.split_seeds("test", 4) for s in [scenes.scene(seed)]
            for qa in scenes.questions(s)[:3]]
    with VQAPipeline.from_pretrained("mmattn/shapes-vlm", methods=[FastV(layer=2, keep=0.33)],
                                     max_new_tokens=2) as vqa:
        batch = vqa.answer_batch([(image, qa.question) for image, qa in rows])
        assert batch[0].stats.kept_image_positions.shape == (len(rows), 48)
        assert batch[0].stats.tokens_per_layer[2] < batch[0].stats.tokens_per_layer[1]
        single = [vqa.answer(image, qa.question).answer for image, qa in rows]
        model = vqa.model
    assert [r.answer for r in batch] == single
    assert all(answer.split()[0] in scenes.VOCABULARY for answer in single)
    assert sum(r.answer.split()[0] == qa.answer for r, (_, qa) in zip(batch, rows)) >= len(rows) // 2
    assert model.config.text_config._attn_implementation == "sdpa"


def test_vqa_pipeline_without_methods_has_no_stats():
    vqa = VQAPipeline.from_pretrained("tiny/llava", max_new_tokens=2)
    image = scenes.render(scenes.scene(1), 64)
    result = vqa.answer([image], "What is this?")
    assert result.stats is None and isinstance(result.answer, str)
    assert torch.is_tensor(vqa.model.lm_head.weight)


def test_vqa_pipeline_reports_sinks_and_time():
    from mmattn import VAR

    image = scenes.render(scenes.scene(3), 48)
    with VQAPipeline.from_pretrained("mmattn/shapes-vlm", methods=[VAR(tau=2.0, first_layer=1)],
                                     max_new_tokens=2) as vqa:
        result = vqa.answer(image, "what color is the circle")
    assert result.stats is None and result.seconds > 0
    assert result.sinks is not None and [s.layer for s in result.sinks.layers] == [1, 2, 3]
