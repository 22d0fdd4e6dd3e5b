"""Shapes world: deterministic synthetic scenes of coloured shapes, their captions and question-answer pairs.

A scene holds 1-4 objects, each a (shape, colour, size) in its own cell of a 3 x 3 grid, on a plain or lightly
textured dark background. ``scene(seed)`` is a pure function of the seed; the splits are disjoint seed ranges
(``split_seeds("test", n)``). Everything a user sees is words from ``VOCABULARY``, so a word-level tokenizer
covers every caption, question and answer.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {  # name: RGB
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 210),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
}
SIZES = {"small": 0.28, "large": 0.44}  # radius as a fraction of a grid cell's side
COLUMNS = ("left", "center", "right")
ROWS = ("top", "middle", "bottom")
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("colour", "shape", "count", "position", "existence", "size")
SPLITS = {"train": 0, "val": 10_000_000, "test": 20_000_000}  # first seed of each split; 10M seeds each


@dataclass(frozen=True)
class Thing:
    """One object: its shape, colour, size and grid cell (column 0-2 left to right, row 0-2 top to bottom)."""

    shape: str
    colour: str
    size: str
    column: int
    row: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: tuple[int, int, int]
    texture: float  # amplitude of the background noise, 0 for plain
    seed: int


@dataclass(frozen=True)
class QA:
    question: str
    answer: str  # one word
    kind: str  # one of QUESTION_TYPES


def split_seeds(split: str, n: int, start: int = 0) -> range:
    """``n`` seeds of ``split`` ("train", "val" or "test"), from the split's ``start``-th seed on."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    first = SPLITS[split] + start
    return range(first, first + n)


def scene(seed: int, max_things: int = 4) -> Scene:
    """The scene of ``seed``: 1-``max_things`` objects with distinct (shape, colour) pairs, each in its own cell."""
    rng = random.Random(seed)
    count = rng.randint(1, max_things)
    cells = rng.sample([(c, r) for c in range(3) for r in range(3)], count)
    kinds = rng.sample([(s, c) for s in SHAPES for c in COLOURS], count)
    things = tuple(Thing(s, c, rng.choice(tuple(SIZES)), col, row) for (s, c), (col, row) in zip(kinds, cells))
    grey = rng.randint(20, 70)
    background = (grey + rng.randint(-10, 10), grey + rng.randint(-10, 10), grey + rng.randint(-10, 10))
    return Scene(things, background, rng.choice((0.0, 0.0, 8.0, 16.0)), seed)


def render(s: Scene, size: int = 64) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image (drawn at 4x and downsampled: smooth edges)."""
    big = size * 4
    noise = np.random.default_rng(s.seed).normal(0, s.texture, (big // 8, big // 8, 3)) if s.texture else 0
    base = np.clip(np.array(s.background, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(base, (big // 8, big // 8, 3)).copy()).resize((big, big), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    cell = big / 3
    for t in s.things:
        cx, cy, r = (t.column + 0.5) * cell, (t.row + 0.5) * cell, SIZES[t.size] * cell
        _draw_shape(draw, t.shape, cx, cy, r, COLOURS[t.colour])
    return image.resize((size, size), Image.LANCZOS)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    elif shape == "star":
        points = [(cx + (r if i % 2 == 0 else r * 0.45) * math.sin(i * math.pi / 5),
                   cy - (r if i % 2 == 0 else r * 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    else:
        raise ValueError(f"shape={shape!r}: expected one of {', '.join(SHAPES)}")


def caption(s: Scene) -> str:
    """"a large red circle" for one object; "a red circle left of a blue square" for two (their first relation
    that holds: left of, right of, above, below); the objects joined by "and" for more."""
    things = s.things
    if len(things) == 1:
        return f"a {things[0].size} {things[0].name}"
    if len(things) == 2:
        a, b = things
        return f"a {a.name} {_relation(a, b)} a {b.name}"
    return " and ".join(f"a {t.name}" for t in things)


def _relation(a: Thing, b: Thing) -> str:
    if a.column != b.column:
        return "left of" if a.column < b.column else "right of"
    return "above" if a.row < b.row else "below"


def questions(s: Scene) -> list[QA]:
    """One question of each type about the scene (answers are single words), chosen by the scene's seed."""
    rng = random.Random(s.seed + 1)
    things = s.things
    out = []
    t = rng.choice(things)
    shapes = [x.shape for x in things]
    colours = [x.colour for x in things]
    if shapes.count(t.shape) == 1:
        out.append(QA(f"what color is the {t.shape}", t.colour, "colour"))
    else:
        out.append(QA(f"what color is the {t.size} {t.shape}" if [(x.shape, x.size) for x in things].count(
            (t.shape, t.size)) == 1 else f"what color is the {t.shape} on the {COLUMNS[t.column]}"
            if [(x.shape, x.column) for x in things].count((t.shape, t.column)) == 1
            else f"what color is the {t.shape} at the {ROWS[t.row]}", t.colour, "colour"))
    if colours.count(t.colour) == 1:
        out.append(QA(f"what shape is the {t.colour} object", t.shape, "shape"))
    else:
        out.append(QA(f"what shape is on the {COLUMNS[t.column]} at the {ROWS[t.row]}", t.shape, "shape"))
    if rng.random() < 0.5:
        out.append(QA("how many shapes are there", NUMBERS[len(things)], "count"))
    else:
        colour = rng.choice(colours + [rng.choice(tuple(COLOURS))])
        out.append(QA(f"how many {colour} shapes are there", NUMBERS[colours.count(colour)], "count"))
    if len(things) >= 2:
        a, b = rng.sample(things, 2)
        if rng.random() < 0.5:
            relation, holds = ("left of", a.column < b.column) if rng.random() < 0.5 else ("above", a.row < b.row)
        else:
            relation, holds = ("right of", a.column > b.column) if rng.random() < 0.5 else ("below", a.row > b.row)
        out.append(QA(f"is the {a.name} {relation} the {b.name}", "yes" if holds else "no", "position"))
    else:
        out.append(QA(f"where is the {t.shape}", COLUMNS[t.column], "position"))
    if rng.random() < 0.5:
        x = rng.choice(things)
        out.append(QA(f"is there a {x.name}", "yes", "existence"))
    else:
        absent = [(sh, c) for sh in SHAPES for c in COLOURS if (sh, c) not in {(x.shape, x.colour) for x in things}]
        sh, c = rng.choice(absent)
        out.append(QA(f"is there a {c} {sh}", "no", "existence"))
    out.append(QA(f"what size is the {t.name}", t.size, "size"))
    return out


VOCABULARY = tuple(sorted(
    set(SHAPES) | set(COLOURS) | set(SIZES) | set(COLUMNS) | set(ROWS) | set(NUMBERS)
    | set("a and of left right above below what color is the shape object on at how many shapes are there "
          "where yes no size".split())))
