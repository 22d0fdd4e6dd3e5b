"""shapes-t2i: a small Stable Diffusion 3 (``StableDiffusion3Pipeline``) trained on shapes-world captions.

64 x 64 images; an ``AutoencoderKL`` with spatial factor 8 and 8 latent channels, and the SD3 transformer's 1 x 1
patches, give 8 x 8 = 64 image tokens (a compact latent: the decoder draws the shapes' edges, the transformer places
them; a factor-4, 16-channel latent left the transformer the edges and it drew blobs); two CLIP text encoders (``CLIPTextModelWithProjection``) over a
word-level CLIP BPE tokenizer; no T5 (SD3 allows it: the pipeline feeds zeros in its place). The pipeline is the
stock class, so every mmattn method that supports SD3 applies to it unchanged. Scenes hold 1-2 objects (the
captions that name size and relations). Call with ``CALL_DEFAULTS`` (``max_sequence_length=16``: the length of
the zero T5 block it was trained with).

``build(seed)`` makes the untrained pipeline, ``train(...)`` trains it (the VAE first, then the transformer and
text encoders by flow matching, 10 % empty captions for CFG), ``load()`` returns the shipped weights,
``adherence(...)`` scores generated images with shapes-classifier.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import scenes
from ._training import earlier_runs, fit, save

IMAGE_SIZE = 64
MAX_THINGS = 2
CLIP_LENGTH = 16  # CLIP tokens (captions are at most 9 words)
T5_LENGTH = 16  # zero tokens in T5's place
WEIGHTS = Path(__file__).parent / "weights" / "shapes-t2i.safetensors"
CARD = Path(__file__).parent / "weights" / "shapes-t2i.json"
CALL_DEFAULTS = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "num_inference_steps": 20, "guidance_scale": 3.0,
                 "max_sequence_length": T5_LENGTH}
VAE = dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, latent_channels=8, norm_num_groups=8)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
TRANSFORMER = dict(num_layers=4, attention_head_dim=32, num_attention_heads=4, qk_norm="rms_norm", patch_size=1)
EMPTY_CAPTIONS = 0.1
ARCHITECTURE = (f"StableDiffusion3Pipeline (SD3 transformer, {TRANSFORMER['patch_size']} x {TRANSFORMER['patch_size']} "
                f"patches; AutoencoderKL x{2 ** (len(VAE['block_out_channels']) - 1)}, {VAE['latent_channels']} latent "
                "channels; two CLIP text encoders)")


def tokenizer():
    """CLIP BPE tokenizer whose merges make every shapes-world word one token (other text falls back to bytes)."""
    from transformers import CLIPTokenizer

    from ..testing.tokenizers import byte_level_alphabet

    vocab = {symbol: i for i, symbol in enumerate(byte_level_alphabet())}
    for symbol in byte_level_alphabet():
        vocab[symbol + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in scenes.VOCABULARY:  # a merge appended last never fires inside a word that already ends whole
        while len(pieces := _bpe(list(word[:-1]) + [word[-1] + "</w>"], merges)) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_LENGTH)


def _bpe(pieces: list[str], merges: list[tuple[str, str]]) -> list[str]:
    """BPE as the tokenizer applies it: merge the adjacent pair of lowest rank until none is left."""
    rank = {pair: i for i, pair in enumerate(merges)}
    while len(pieces) > 1:
        best = min(range(len(pieces) - 1), key=lambda i: rank.get((pieces[i], pieces[i + 1]), len(rank)))
        if (pieces[best], pieces[best + 1]) not in rank:
            break
        pieces = pieces[:best] + [pieces[best] + pieces[best + 1]] + pieces[best + 2:]
    return pieces


def build(seed: int = 0, vae_scale: float = 1.0, vae_shift: float = 0.0):
    """The untrained pipeline (weights drawn from ``seed``); ``vae_scale``/``vae_shift`` are the VAE's latent
    normalisation (``latents = (z - shift) * scale``), set from the trained VAE's latent statistics."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tok = tokenizer()
    levels = len(VAE["block_out_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
                            up_block_types=("UpDecoderBlock2D",) * levels, sample_size=IMAGE_SIZE,
                            scaling_factor=vae_scale, shift_factor=vae_shift, **VAE)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
            **TEXT, vocab_size=len(tok), max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
            for _ in range(2)]
        width = TRANSFORMER["attention_head_dim"] * TRANSFORMER["num_attention_heads"]
        transformer = SD3Transformer2DModel(
            sample_size=IMAGE_SIZE // 2 ** (levels - 1), in_channels=VAE["latent_channels"],
            out_channels=VAE["latent_channels"], joint_attention_dim=2 * TEXT["hidden_size"],
            caption_projection_dim=width, pooled_projection_dim=2 * TEXT["projection_dim"], pos_embed_max_size=48,
            **TRANSFORMER)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
                                    vae=vae, text_encoder=encoders[0], tokenizer=tok, text_encoder_2=encoders[1],
                                    tokenizer_2=tokenizer(), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _modules(pipe) -> dict:
    return {"transformer": pipe.transformer, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
            "text_encoder_2": pipe.text_encoder_2}


def load(path: Path = WEIGHTS):
    """shapes-t2i with its shipped trained weights (a ``StableDiffusion3Pipeline`` on CPU, fp32)."""
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise FileNotFoundError(f"shapes-t2i weights are missing ({path}); train them with "
                                "`python -m mmattn.shapes.train t2i`")
    card = json.loads(Path(path).with_suffix(".json").read_text())
    pipe = build(vae_scale=card["vae_scale"], vae_shift=card["vae_shift"])
    _load_into(pipe, load_file(path))
    return pipe


def _load_into(pipe, weights: dict, only: tuple[str, ...] | None = None) -> None:
    for name, module in _modules(pipe).items():
        if only is None or name in only:
            module.load_state_dict({k.removeprefix(name + "."): v for k, v in weights.items()
                                    if k.startswith(name + ".")})


def images_tensor(images) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] from PIL images (the VAE's range)."""
    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1 for im in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2)


def _scenes(rng: random.Random, n: int, split: str = "train", two_objects: float | None = None) -> list[scenes.Scene]:
    """``n`` random scenes of ``split``; with ``two_objects``, that share of them (in expectation) has two objects
    (seeds drawn until a scene has the count wanted), else the generator's own mix (half and half)."""
    seeds = scenes.split_seeds(split, 10_000_000)
    if two_objects is None:
        return [scenes.scene(rng.choice(seeds), max_things=MAX_THINGS) for _ in range(n)]
    out = []
    for _ in range(n):
        count = 2 if rng.random() < two_objects else 1
        while len((s := scenes.scene(rng.choice(seeds), max_things=MAX_THINGS)).things) != count:
            pass
        out.append(s)
    return out


def train_vae(pipe, steps: int, batch_size: int, lr: float, rng: random.Random, minutes: float | None,
              kl: float = 1e-6, foreground: float = 10.0, perceptual: float = 0.0) -> dict:
    """Reconstruction (L1 + MSE, pixels of the shapes weighted ``foreground`` times the background's: shapes
    cover a small part of an image, and the background's texture would dominate the loss) plus a small KL term,
    on freshly rendered train-split scenes; with ``perceptual`` > 0 also that weight times the mean squared
    distance of shapes-classifier's patch features (frozen) of the reconstruction and of the render, relative to
    the features' variance: a perceptual loss, as LPIPS is for Stable Diffusion's VAE, with a network that knows
    this world. The decoder reads the posterior mean (generation decodes what the transformer makes, never a
    sample of the posterior)."""
    vae = pipe.vae
    features = _classifier_features() if perceptual else None

    def loss_of_step():
        batch = _scenes(rng, batch_size)
        x = images_tensor([scenes.render(s, IMAGE_SIZE) for s in batch])
        background = torch.tensor([s.background for s in batch], dtype=torch.float32)[:, :, None, None] / 127.5 - 1
        weight = 1 + (foreground - 1) * ((x - background).abs().amax(1, keepdim=True) > 0.3)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.mode()).sample
        loss = (weight * ((y - x).abs() + (y - x).square())).mean() + kl * posterior.kl().mean()
        if features is not None:
            with torch.no_grad():
                target = features(x)
            loss = loss + perceptual * F.mse_loss(features(y), target) / target.var()
        return loss

    return fit(vae, loss_of_step, steps, lr, minutes, desc="shapes-t2i vae")


def _classifier_features():
    """x (B, 3, 64, 64) in [-1, 1] -> shapes-classifier's patch features (B, 144, width), gradients to x only."""
    from . import classifier

    judge = classifier.load().requires_grad_(False)
    mean, std = torch.tensor(classifier.MEAN)[:, None, None], torch.tensor(classifier.STD)[:, None, None]

    def features(x):
        x = F.interpolate((x + 1) / 2, size=(classifier.IMAGE_SIZE,) * 2, mode="bilinear", antialias=True)
        return judge.patch_features((x - mean) / std)

    return features


@torch.no_grad()
def encode_dataset(pipe, items: list[scenes.Scene], batch_size: int = 250) -> torch.Tensor:
    """The VAE posterior means of the scenes' renders, unnormalised, (n, C, h, w)."""
    out = []
    for i in range(0, len(items), batch_size):
        x = images_tensor([scenes.render(s, IMAGE_SIZE) for s in items[i:i + batch_size]])
        out.append(pipe.vae.encode(x).latent_dist.mode())
    return torch.cat(out)


class _Denoiser(torch.nn.Module):
    """The trainable part: transformer and both text encoders (for ``fit``)."""

    def __init__(self, pipe):
        super().__init__()
        self.transformer, self.text_encoder, self.text_encoder_2 = pipe.transformer, pipe.text_encoder, pipe.text_encoder_2


def flow_matching_loss(pipe, latents: torch.Tensor, captions: list[str], generator: torch.Generator) -> torch.Tensor:
    """SD3's rectified-flow loss: x_t = (1 - t) x_0 + t noise, target noise - x_0, t logit-normal; the prompt
    embeddings come from the pipeline's own ``encode_prompt``, so training sees what generation sees."""
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=captions, prompt_2=None, prompt_3=None,
                                              do_classifier_free_guidance=False, max_sequence_length=T5_LENGTH,
                                              device=latents.device)
    noise = torch.randn(latents.shape, generator=generator)
    t = torch.sigmoid(torch.randn(latents.shape[0], generator=generator))[:, None, None, None]
    noisy = (1 - t) * latents + t * noise
    prediction = pipe.transformer(hidden_states=noisy, timestep=t.flatten() * 1000, encoder_hidden_states=embeds,
                                  pooled_projections=pooled, return_dict=False)[0]
    return F.mse_loss(prediction, noise - latents)


def train(steps: int = 20000, batch_size: int = 32, lr: float = 1e-3, seed: int = 0, minutes: float | None = None,
          log_every: int = 100, out: Path | None = None, eval_images: int = 200, command: str | None = None,
          vae_steps: int = 3000, vae_minutes: float | None = 6.0, dataset: int = 20000,
          init: Path | None = None, vae_init: Path | None = None, ema: float | None = 0.999,
          vae_perceptual: float = 1.0, two_objects: float | None = None) -> dict:
    """Train shapes-t2i from ``seed``: the VAE (``vae_steps``/``vae_minutes``; skipped when ``init`` or
    ``vae_init`` is given, whose VAE is kept), then the transformer and text encoders on ``dataset`` cached
    train-split latents (``steps``/``minutes``; the weights kept are their ``ema`` average), ``two_objects`` of
    them two-object scenes when given (else half). Writes the weights and
    a model card to ``out`` when given. Returns the card."""
    if two_objects is not None and not 0 <= two_objects <= 1:
        raise ValueError(f"two_objects={two_objects}: expected a share in [0, 1]")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    pipe = build(seed)
    previous = []
    if init is not None or vae_init is not None:
        from safetensors.torch import load_file

        source = Path(init if init is not None else vae_init)
        _load_into(pipe, load_file(source), only=None if init is not None else ("vae",))
        vae_run = json.loads(source.with_suffix(".json").read_text())["vae_training"]
        if init is not None:
            previous = earlier_runs(source.with_suffix(".json"))
    else:
        vae_run = train_vae(pipe, vae_steps, 16, 2e-3, rng, vae_minutes, perceptual=vae_perceptual)
        vae_run["perceptual"] = vae_perceptual
    pipe.vae.requires_grad_(False).eval()
    items = _scenes(rng, dataset, two_objects=two_objects)
    raw = encode_dataset(pipe, items)
    shift, scale = raw.mean().item(), 1 / raw.std().item()
    pipe.vae.register_to_config(scaling_factor=scale, shift_factor=shift)
    latents = (raw - shift) * scale
    captions = [scenes.caption(s) for s in items]
    generator = torch.Generator().manual_seed(seed)
    denoiser = _Denoiser(pipe)

    def loss_of_step():
        index = [rng.randrange(len(items)) for _ in range(batch_size)]
        text = ["" if rng.random() < EMPTY_CAPTIONS else captions[i] for i in index]
        return flow_matching_loss(pipe, latents[index], text, generator)

    run = fit(denoiser, loss_of_step, steps, lr, minutes, log_every, clip=1.0, desc="shapes-t2i denoiser", ema=ema)
    card = {"model": "mmattn/shapes-t2i", "command": command,
            "architecture": ARCHITECTURE,
            "data": f"shapes-world train split with 1-{MAX_THINGS} objects, {IMAGE_SIZE} x {IMAGE_SIZE} renders, "
                    f"{dataset} cached latents"
                    + (f" ({two_objects:.0%} two-object)" if two_objects is not None else "")
                    + f", {EMPTY_CAPTIONS:.0%} empty captions",
            "image_tokens": (IMAGE_SIZE // 2 ** (len(VAE["block_out_channels"]) - 1) // TRANSFORMER["patch_size"]) ** 2,
            "seed": seed, "steps": run["steps"], "batch_size": batch_size, "lr": lr, "ema": ema, "train_minutes": run["minutes"],
            "threads": torch.get_num_threads(), "vae_scale": scale, "vae_shift": shift,
            "vae_training": {k: v for k, v in vae_run.items() if k != "history"},
            "parameters": sum(p.numel() for m in _modules(pipe).values() for p in m.parameters()),
            "history": run["history"], "continued_from": previous, "call_defaults": CALL_DEFAULTS,
            "test": evaluate(pipe, "test", eval_images)}
    if out is not None:
        save(torch.nn.ModuleDict(_modules(pipe)), out, WEIGHTS.name, CARD.name, card)
    return card


def prompts(split: str = "test", n: int = 200) -> list[scenes.Scene]:
    """The first ``n`` scenes of ``split`` with 1-2 objects (their captions are the prompts)."""
    return [scenes.scene(seed, max_things=MAX_THINGS) for seed in scenes.split_seeds(split, n)]


def matches(s: scenes.Scene, found: set[tuple[str, str, str, int, int]]) -> bool:
    """Whether the classifier's objects ``found`` in an image satisfy ``s``'s caption: exactly the captioned
    (shape, colour) pairs, the size when the caption names it (one object), the relation when it names one (two)."""
    if sorted((f[0], f[1]) for f in found) != sorted((t.shape, t.colour) for t in s.things):
        return False
    by_kind = {(f[0], f[1]): f for f in found}
    if len(s.things) == 1:
        return by_kind[(s.things[0].shape, s.things[0].colour)][2] == s.things[0].size
    a, b = (by_kind[(t.shape, t.colour)] for t in s.things[:2])
    relation = scenes._relation(*s.things[:2])
    return {"left of": a[3] < b[3], "right of": a[3] > b[3], "above": a[4] < b[4], "below": a[4] > b[4]}[relation]


@torch.no_grad()
def generate(pipe, items: list[scenes.Scene], seed: int = 0, batch_size: int = 50, **call) -> list:
    """One image per scene caption (generator seeded per batch from ``seed``), ``CALL_DEFAULTS`` overridden by ``call``."""
    images = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        out = pipe([scenes.caption(s) for s in chunk], generator=torch.Generator().manual_seed(seed + i),
                   **{**CALL_DEFAULTS, **call})
        images += out.images
    return images


@torch.no_grad()
def evaluate(pipe, split: str = "test", n: int = 200, classifier=None, **call) -> dict:
    """Prompt adherence by shapes-classifier: the share of ``n`` generated images whose objects match their
    caption (``matches``: shapes, colours, the size or relation it names), overall and by object count; the
    looser shares whose objects are exactly the caption's (shape, colour) pairs (``shape_colour_adherence``) and
    have exactly its colours (``colour_adherence``)."""
    from . import classifier as classifier_module

    judge = classifier or classifier_module.load()
    items = prompts(split, n)
    found = classifier_module.describe(judge, generate(pipe, items, **call))
    hits = [matches(s, f) for s, f in zip(items, found)]
    by_count = {f"{k} object{'s' * (k > 1)}": float(np.mean([h for h, s in zip(hits, items) if len(s.things) == k]))
                for k in range(1, MAX_THINGS + 1)}
    colours = [sorted(f[1] for f in fs) == sorted(t.colour for t in s.things) for s, fs in zip(items, found)]
    kinds = [sorted(f[:2] for f in fs) == sorted((t.shape, t.colour) for t in s.things) for s, fs in zip(items, found)]
    return {"adherence": float(np.mean(hits)), "by_count": by_count,
            "shape_colour_adherence": float(np.mean(kinds)), "colour_adherence": float(np.mean(colours)),
            "images": n, "guidance_scale": {**CALL_DEFAULTS, **call}["guidance_scale"]}
