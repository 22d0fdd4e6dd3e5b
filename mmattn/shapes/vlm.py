"""shapes-vlm: a small LLaVA (``LlavaForConditionalGeneration``) trained on shapes-world questions.

A CLIP-style vision tower (48 px images, 4 px patches: 144 image tokens, [CLS] dropped by LLaVA's "default"
feature strategy from layer -2), LLaVA's 2-layer GELU projector and a Llama-style language model, with a
word-level tokenizer and a ``LlavaProcessor`` built in code. Every mmattn method that supports LLaVA applies
to it unchanged. ``build(seed)`` makes the untrained model; ``train(...)`` trains it; ``load()`` returns the
shipped weights (``mmattn/shapes/weights/shapes-vlm.safetensors``).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from ..testing import TinyVLM
from ..testing.llava import LLAVA_CHAT_TEMPLATE
from . import scenes
from ._training import earlier_runs, fit, save

IMAGE_SIZE, PATCH = 48, 4
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 144
SPECIAL = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
TEMPLATE_WORDS = ("USER", "ASSISTANT", ":")
WEIGHTS = Path(__file__).parent / "weights" / "shapes-vlm.safetensors"
CARD = Path(__file__).parent / "weights" / "shapes-vlm.json"

VISION = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4)
TEXT = dict(hidden_size=128, intermediate_size=320, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tokenizer():
    """Word-level tokenizer over the shapes-world vocabulary, LLaVA's chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate((*SPECIAL, *TEMPLATE_WORDS, *scenes.VOCABULARY))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"}, chat_template=LLAVA_CHAT_TEMPLATE, padding_side="left",
        model_max_length=TEXT["max_position_embeddings"])


def build(seed: int = 0) -> TinyVLM:
    """The untrained shapes-vlm (weights drawn from ``seed``) and its processor."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from ..testing._vlm import finish_vlm, special_token_ids

    tok = tokenizer()
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**VISION, image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu"),
        text_config=LlamaConfig(**TEXT, vocab_size=len(tok), hidden_act="silu", rms_norm_eps=1e-5,
                                tie_word_embeddings=False, **special_token_ids(tok)),
        image_token_index=tok.image_token_id, image_seq_length=IMAGE_TOKENS, projector_hidden_act="gelu",
        vision_feature_layer=-2, vision_feature_select_strategy="default", attn_implementation="sdpa")
    config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = finish_vlm(LlavaForConditionalGeneration(config), tok, torch.float32)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>")
    return TinyVLM(model, processor)


def load() -> TinyVLM:
    """shapes-vlm with its shipped trained weights."""
    from safetensors.torch import load_file

    if not WEIGHTS.exists():
        raise FileNotFoundError(f"shapes-vlm weights are missing ({WEIGHTS}); train them with "
                                "`python -m mmattn.shapes.train vlm`")
    vlm = build()
    vlm.model.load_state_dict(load_file(WEIGHTS))
    return vlm


def prompt(processor, question: str) -> str:
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(chat, add_generation_prompt=True)


def question_batch(processor, items: list[tuple[scenes.Scene, scenes.QA]]):
    """Processor inputs asking each (scene, question) pair in a one-turn chat, left-padded."""
    texts = [prompt(processor, qa.question) for _, qa in items]
    images = [scenes.render(s, IMAGE_SIZE) for s, _ in items]
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


def conversation_batch(processor, rng: random.Random, seeds: range, size: int):
    """Training inputs: ``size`` scenes, each one conversation asking all its questions in a random order
    (the image's 144 tokens are paid once for six answers); labels on each answer word and its ``</s>``."""
    tok = processor.tokenizer
    texts, images = [], []
    for _ in range(size):
        s = scenes.scene(rng.choice(seeds))
        qas = scenes.questions(s)
        rng.shuffle(qas)
        chat = []
        for i, qa in enumerate(qas):
            content = [{"type": "text", "text": qa.question}]
            chat += [{"role": "user", "content": [{"type": "image"}] + content if i == 0 else content},
                     {"role": "assistant", "content": [{"type": "text", "text": qa.answer}]}]
        texts.append(processor.apply_chat_template(chat))
        images.append(scenes.render(s, IMAGE_SIZE))
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    ids = inputs["input_ids"]
    eos = ids == tok.eos_token_id
    answer = torch.roll(eos, -1, dims=1) & ~eos  # the word before each </s>
    inputs["labels"] = torch.where(answer | eos, ids, -100)
    return inputs


@torch.no_grad()
def evaluate(vlm: TinyVLM, split: str = "test", n: int = 600, batch_size: int = 50) -> dict:
    """Greedy one-word answers to every question of ``n // 6`` scenes of ``split``: accuracy overall and per type,
    and the mean time of one batch's answer (its prefill: one new token)."""
    model, processor = vlm.model, vlm.processor
    items = [(s, qa) for seed in scenes.split_seeds(split, max(1, n // 6)) for s in [scenes.scene(seed)]
             for qa in scenes.questions(s)]
    right, total, seconds = {}, {}, []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        inputs = question_batch(processor, chunk)
        started = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        seconds.append(time.perf_counter() - started)
        words = processor.tokenizer.batch_decode(out[:, -1:], skip_special_tokens=True)
        for (_, qa), word in zip(chunk, words):
            total[qa.kind] = total.get(qa.kind, 0) + 1
            right[qa.kind] = right.get(qa.kind, 0) + (word.strip() == qa.answer)
    per_type = {kind: right[kind] / total[kind] for kind in scenes.QUESTION_TYPES if kind in total}
    return {"accuracy": sum(right.values()) / sum(total.values()), "per_type": per_type, "questions": len(items),
            "batch_seconds": sum(seconds) / len(seconds), "batch_size": batch_size}


def train(steps: int = 3000, batch_size: int = 16, lr: float = 2e-3, seed: int = 0, minutes: float | None = None,
          log_every: int = 100, out: Path | None = None, eval_questions: int = 600,
          vision_init: Path | None = None, freeze_vision: bool = True, init: Path | None = None,
          command: str | None = None) -> dict:
    """Train shapes-vlm from ``seed`` on train-split questions (AdamW, warmup then cosine decay); stops after
    ``steps`` or ``minutes``. ``vision_init``: a shapes-classifier safetensors file whose tower initialises the
    vision tower (kept frozen with ``freeze_vision``: the projector and the language model learn). ``init``: a
    shapes-vlm safetensors file to continue from (a new schedule; its card's history is kept). Writes the
    weights and a model card to ``out`` (a folder) when given. Returns the card."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vlm = build(seed)
    model, processor = vlm.model, vlm.processor
    if vision_init is not None:
        from safetensors.torch import load_file

        tower = {k.removeprefix("tower."): v for k, v in load_file(vision_init).items() if k.startswith("tower.")}
        model.model.vision_tower.load_state_dict(tower)
        model.model.vision_tower.requires_grad_(not freeze_vision)
    previous = []
    if init is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(init))
        previous = earlier_runs(Path(init).with_suffix(".json"))
    seeds = scenes.split_seeds("train", 10_000_000)
    run = fit(model, lambda: model(**conversation_batch(processor, rng, seeds, batch_size)).loss, steps, lr,
              minutes, log_every, clip=1.0, desc="shapes-vlm", betas=(0.9, 0.98))
    card = {"model": "mmattn/shapes-vlm", "command": command, "architecture": "LlavaForConditionalGeneration (CLIP vision + Llama)",
            "data": "shapes-world train split: one conversation per scene, all six questions in random order",
            "image_tokens": IMAGE_TOKENS, "seed": seed, "steps": run["steps"], "batch_size": batch_size, "lr": lr,
            "train_minutes": run["minutes"], "threads": torch.get_num_threads(),
            "vision_init": None if vision_init is None else Path(vision_init).name,
            "vision_frozen": vision_init is not None and freeze_vision,
            "parameters": sum(p.numel() for p in model.parameters()), "history": run["history"],
            "continued_from": previous, "test": evaluate(vlm, "test", eval_questions)}
    if out is not None:
        save(model, out, WEIGHTS.name, CARD.name, card)
    return card
