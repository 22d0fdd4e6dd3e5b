"""VQAPipeline: answer questions about images with a transformers VLM and mmattn methods applied.

    vqa = VQAPipeline.from_pretrained("mmattn/shapes-vlm", methods=[FastV(layer=2, keep=0.33)])
    result = vqa.answer(image, "what color is the circle")
    result.answer, result.stats.equivalent_tokens, result.stats.prefill_seconds

Models load by id (``mmattn/shapes-vlm`` and ``tiny/<name>`` offline, anything else through from_pretrained).
The methods stay applied for the pipeline's life; ``close()`` (or ``with``) restores the model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

import mmattn
from mmattn.hub import load_vlm
from mmattn.processors import pruning, sinks


@dataclass
class VQAResult:
    """One answer; what the pruning method did for the prefill that produced it (``stats``: tokens kept, equivalent
    tokens, prefill and decode time; None without pruning); what VAR did in the last forward (``sinks``: sinks per
    layer, rows redistributed, mass moved; None without it); ``seconds``: the whole generate() of its batch."""

    question: str
    answer: str
    stats: pruning.PruningStats | None
    sinks: sinks.SinkStats | None = None
    seconds: float = 0.0


class VQAPipeline:
    def __init__(self, model, processor, methods: Sequence[Any] = (), max_new_tokens: int = 16):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.handle = mmattn.apply(model, list(methods)) if methods else None

    @classmethod
    def from_pretrained(cls, model_id: str, methods: Sequence[Any] = (), dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", max_new_tokens: int = 16) -> VQAPipeline:
        model, processor = load_vlm(model_id, dtype=dtype)
        return cls(model.to(device), processor, methods, max_new_tokens)

    def _inputs(self, rows: Sequence[tuple[Sequence[Any], str]]):
        prompts = []
        for images, question in rows:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
            prompts.append(self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                              add_generation_prompt=True))
        images = [image for row_images, _ in rows for image in row_images]
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True)
        return inputs.to(self.model.device)

    @torch.no_grad()
    def answer_batch(self, rows: Sequence[tuple[Any, str]]) -> list[VQAResult]:
        """Answers to (image or list of images, question) rows, generated as one left-padded batch (greedy)."""
        rows = [([images] if not isinstance(images, (list, tuple)) else list(images), question)
                for images, question in rows]
        inputs = self._inputs(rows)
        started = time.perf_counter()
        out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        seconds = time.perf_counter() - started
        texts = self.processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        stats = pruning.last_stats(self.model) if self.handle is not None else None
        sink_stats = sinks.last_sink_stats(self.model) if self.handle is not None else None
        return [VQAResult(question, text.strip(), stats, sink_stats, seconds) for (_, question), text in zip(rows, texts)]

    def answer(self, images, question: str) -> VQAResult:
        """The answer to one question about one image (or a list of images)."""
        return self.answer_batch([(images, question)])[0]

    def close(self) -> None:
        """Remove the methods: the model is exactly as it was loaded."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __enter__(self) -> VQAPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
