"""shapes-classifier: what is in each cell of a shapes-world image, to score generated images.

A CLIP vision tower (``CLIPVisionModel``, the same configuration as shapes-vlm's) reads a 48 x 48 image (larger
ones are resized); the patch features of layer -2 (shapes-vlm's feature layer) in each of the 3 x 3 grid cells
are averaged and three linear heads predict
the cell's shape (or "empty"), colour and size. Training also asks each patch feature on its own what its cell
holds (the same heads) and which cell it lies in (a fourth head, ``where``), so that every image token shapes-vlm
reads names its object and its place. ``describe(images)`` returns the objects found, so a generated
image can be checked against its prompt (``matches(scene_things, found)``). Its trained tower also initialises
shapes-vlm's vision tower.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import scenes
from ._training import fit, save

IMAGE_SIZE, PATCH = 48, 4
WEIGHTS = Path(__file__).parent / "weights" / "shapes-classifier.safetensors"
CARD = Path(__file__).parent / "weights" / "shapes-classifier.json"
SHAPE_CLASSES = ("empty", *scenes.SHAPES)
COLOUR_CLASSES = tuple(scenes.COLOURS)
SIZE_CLASSES = tuple(scenes.SIZES)
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, as CLIPImageProcessor normalises
STD = (0.26862954, 0.26130258, 0.27577711)


class ShapesClassifier(torch.nn.Module):
    def __init__(self, vision_config: dict):
        from transformers import CLIPVisionConfig, CLIPVisionModel

        super().__init__()
        config = CLIPVisionConfig(**vision_config, image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu")
        self.tower = CLIPVisionModel(config)
        width = config.hidden_size
        self.shape = torch.nn.Linear(width, len(SHAPE_CLASSES))
        self.colour = torch.nn.Linear(width, len(COLOUR_CLASSES))
        self.size = torch.nn.Linear(width, len(SIZE_CLASSES))
        self.where = torch.nn.Linear(width, 9)

    def patch_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 144, width): layer -2's features without [CLS], what shapes-vlm's projector reads (LLaVA's feature
        layer)."""
        return self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits (B, 9, classes) of shape, colour and size per cell (row-major: cell = row * 3 + column)."""
        return self.heads(cell_means(self.patch_features(pixel_values)))

    def heads(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.shape(features), self.colour(features), self.size(features)


SIDE = IMAGE_SIZE // PATCH  # 12 patches a side, 4 x 4 in each of the 3 x 3 cells
PATCH_CELL = torch.tensor([(i // SIDE) // (SIDE // 3) * 3 + (i % SIDE) // (SIDE // 3) for i in range(SIDE * SIDE)])


def cell_means(patches: torch.Tensor) -> torch.Tensor:
    """(B, 9, width): the mean patch feature of each cell."""
    grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, SIDE, SIDE)
    return F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)


def pixels(images) -> torch.Tensor:
    """(B, 3, 48, 48) CLIP-normalised pixels of PIL images (resized to 48 x 48 when needed)."""
    arrays = [np.asarray(im.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)), dtype=np.float32) / 255 for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def targets(batch: list[scenes.Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per cell: shape class (0 = empty), colour and size classes (-100 where the cell is empty)."""
    shape = torch.zeros(len(batch), 9, dtype=torch.long)
    colour = torch.full((len(batch), 9), -100)
    size = torch.full((len(batch), 9), -100)
    for i, s in enumerate(batch):
        for t in s.things:
            cell = t.row * 3 + t.column
            shape[i, cell] = SHAPE_CLASSES.index(t.shape)
            colour[i, cell] = COLOUR_CLASSES.index(t.colour)
            size[i, cell] = SIZE_CLASSES.index(t.size)
    return shape, colour, size


def build(seed: int = 0) -> ShapesClassifier:
    from .vlm import VISION

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ShapesClassifier(VISION)
    return model.eval()


def load() -> ShapesClassifier:
    from safetensors.torch import load_file

    if not WEIGHTS.exists():
        raise FileNotFoundError(f"shapes-classifier weights are missing ({WEIGHTS}); train them with "
                                "`python -m mmattn.shapes.train classifier`")
    model = build()
    model.load_state_dict(load_file(WEIGHTS))
    return model


@torch.no_grad()
def describe(model: ShapesClassifier, images) -> list[set[tuple[str, str, str, int, int]]]:
    """The objects found in each image: {(shape, colour, size, column, row)}."""
    shape, colour, size = model(pixels(images))
    found = []
    for b in range(shape.shape[0]):
        things = set()
        for cell in range(9):
            s = int(shape[b, cell].argmax())
            if s:
                things.add((SHAPE_CLASSES[s], COLOUR_CLASSES[int(colour[b, cell].argmax())],
                            SIZE_CLASSES[int(size[b, cell].argmax())], cell % 3, cell // 3))
        found.append(things)
    return found


def caption_objects(caption: str) -> list[tuple[str, str]]:
    """The (shape, colour) pairs a shapes-world caption names ("a red circle left of a blue square")."""
    words = caption.lower().replace(",", " ").split()
    return [(shape, colour) for colour, shape in zip(words, words[1:]) if colour in scenes.COLOURS and shape in scenes.SHAPES]


@functools.lru_cache(maxsize=1)
def _shipped() -> ShapesClassifier:
    return load()


@torch.no_grad()
def adherence(images: torch.Tensor, prompts) -> torch.Tensor:
    """A head-search objective (``mmattn heads search --objective adherence``): per image (B, 3, H, W) in [0, 1],
    the mean over its caption's objects of the best cell's P(shape) · P(colour) by the shipped classifier, minus
    the expected number of objects beyond the caption's (a soft version of ``t2i.matches``)."""
    model = _shipped()
    x = F.interpolate(images.float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    shape, colour, _ = (logits.softmax(-1) for logits in model(x))
    scores = []
    for b, prompt in enumerate(prompts):
        wanted = caption_objects(prompt)
        found = [(shape[b, :, SHAPE_CLASSES.index(sh)] * colour[b, :, COLOUR_CLASSES.index(co)]).max()
                 for sh, co in wanted]
        extra = (1 - shape[b, :, 0]).sum() - len(wanted)
        scores.append((torch.stack(found).mean() if found else torch.tensor(0.0)) - extra.clamp_min(0) / 9)
    return torch.stack(scores)


@torch.no_grad()
def evaluate(model: ShapesClassifier, split: str = "test", n: int = 500, batch_size: int = 100) -> dict:
    """Cell accuracy of each head, and the share of images whose every object (shape, colour, size, cell) is found
    exactly with nothing else."""
    model.eval()
    right = {"shape": 0, "colour": 0, "size": 0}
    count = {"shape": 0, "colour": 0, "size": 0}
    exact = 0
    seeds = list(scenes.split_seeds(split, n))
    for i in range(0, n, batch_size):
        batch = [scenes.scene(seed) for seed in seeds[i:i + batch_size]]
        images = [scenes.render(s, IMAGE_SIZE) for s in batch]
        logits = model(pixels(images))
        for name, logit, target in zip(right, logits, targets(batch)):
            valid = target != -100
            right[name] += int((logit.argmax(-1) == target)[valid].sum())
            count[name] += int(valid.sum())
        for s, found in zip(batch, describe(model, images)):
            exact += found == {(t.shape, t.colour, t.size, t.column, t.row) for t in s.things}
    return {**{f"{k}_accuracy": right[k] / count[k] for k in right}, "scene_exact": exact / n, "images": n}


def train(steps: int = 1500, batch_size: int = 32, lr: float = 2e-3, seed: int = 0, minutes: float | None = None,
          log_every: int = 100, out: Path | None = None, eval_images: int = 500, command: str | None = None) -> dict:
    """Train shapes-classifier on train-split scenes (AdamW, warmup then cosine decay); stops after ``steps`` or
    ``minutes``. Writes weights and a model card to ``out`` when given. Returns the card."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = build(seed)
    seeds = scenes.split_seeds("train", 10_000_000)

    def loss_of_step():
        batch = [scenes.scene(rng.choice(seeds)) for _ in range(batch_size)]
        patches = model.patch_features(pixels([scenes.render(s, IMAGE_SIZE) for s in batch]))
        cell_targets = targets(batch)
        loss = sum(F.cross_entropy(logit.flatten(0, 1), target.flatten(), ignore_index=-100)
                   for logit, target in zip(model.heads(cell_means(patches)), cell_targets))
        # each patch on its own: what its cell holds, and which cell it is
        loss = loss + sum(F.cross_entropy(logit.flatten(0, 1), target[:, PATCH_CELL].flatten(), ignore_index=-100)
                          for logit, target in zip(model.heads(patches), cell_targets))
        where = model.where(patches).flatten(0, 1)
        return loss + F.cross_entropy(where, PATCH_CELL.repeat(len(batch)))

    run = fit(model, loss_of_step, steps, lr, minutes, log_every, desc="shapes-classifier")
    card = {"model": "mmattn/shapes-classifier", "command": command, "architecture": "CLIPVisionModel + per-cell linear heads",
            "objective": "per-cell shape/colour/size, the same per patch, and each patch's cell",
            "data": "shapes-world train split, 48 x 48 renders", "seed": seed, "steps": run["steps"],
            "batch_size": batch_size, "lr": lr, "train_minutes": run["minutes"], "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in model.parameters()), "history": run["history"],
            "test": evaluate(model, "test", eval_images)}
    if out is not None:
        save(model, out, WEIGHTS.name, CARD.name, card)
    return card
