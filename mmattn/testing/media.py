"""Seeded noise images and videos, and chat questions, to feed the tiny models' processors."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["LONG_QUESTION", "QUESTION", "VIDEO_QUESTION", "question_inputs", "random_image", "random_video"]

QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
LONG_QUESTION = [{"role": "user", "content": [
    {"type": "image"}, {"type": "text", "text": "Describe every object in this picture, in detail."}]}]
VIDEO_QUESTION = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A ``width`` x ``height`` RGB image of uniform noise; the same seed gives the same pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_video(frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """``frames`` RGB frames of uniform noise as a ``(frames, height, width, 3)`` uint8 array."""
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def question_inputs(processor):
    """QUESTION about a 64x48 noise image, through the processor's chat template."""
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    return processor(text=[prompt], images=[random_image(64, 48, seed=1)], return_tensors="pt")
