"""Seeded noise images and videos to feed the tiny models' processors."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["random_image", "random_video"]


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A ``width`` x ``height`` RGB image of uniform noise; the same seed gives the same pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_video(frames: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """``frames`` RGB frames of uniform noise as a ``(frames, height, width, 3)`` uint8 array."""
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
