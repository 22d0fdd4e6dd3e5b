"""Tiny Gemma-family VLMs: Gemma 3 and PaliGemma, a SigLIP vision tower feeding a Gemma LM.

``tiny/gemma3``: every image is 32 x 32 pixels, 8 x 8 patches of 4 pixels, average-pooled 2 x 2 into
16 soft tokens, written ``\\n\\n<start_of_image><image_soft_token>*16<end_of_image>\\n\\n``. The LM has
three layers, sliding-window (window 8), sliding, full: so both per-layer-type masks exist. Image
tokens attend to each other bidirectionally (``token_type_ids``).

``tiny/paligemma``: every image is 32 x 32 pixels, 4 x 4 patches of 8 pixels, 16 ``<image>`` tokens
that open the prompt: ``<image>*16<bos>answer en What is this?\\n``; the prefix (image + prompt) is
attended bidirectionally, the answer causally (prefix-LM).
"""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessor,
)

from . import TinyVLM, register_tiny
from ._vlm import finish_vlm, special_token_ids
from .tokenizers import gemma_tokenizer

__all__ = [
    "GEMMA3_CHAT_TEMPLATE",
    "GEMMA3_IMAGE_TOKENS",
    "GEMMA3_LAYER_TYPES",
    "GEMMA3_SLIDING_WINDOW",
    "PALIGEMMA_IMAGE_TOKENS",
    "build_gemma3",
    "build_paligemma",
]

GEMMA3_IMAGE_SIZE, GEMMA3_PATCH = 32, 4  # 8 x 8 patches, pooled to 4 x 4
GEMMA3_IMAGE_TOKENS = 16
GEMMA3_LAYER_TYPES = ("sliding_attention", "sliding_attention", "full_attention")
GEMMA3_SLIDING_WINDOW = 8

PALIGEMMA_IMAGE_SIZE, PALIGEMMA_PATCH = 32, 8  # 4 x 4 patches, one token each
PALIGEMMA_IMAGE_TOKENS = (PALIGEMMA_IMAGE_SIZE // PALIGEMMA_PATCH) ** 2

# Gemma 3 turns: "<start_of_turn>user\n<start_of_image>What is this?<end_of_turn>\n<start_of_turn>model\n".
# A system message is folded into the first user turn. Unlike the hub template this one writes no
# <bos>: the tokenizer adds it, so both `processor(text=template_output)` and
# `apply_chat_template(tokenize=True)` give exactly one <bos>.
GEMMA3_CHAT_TEMPLATE = (
    "{% set ns = namespace(system='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set ns.system = messages[0]['content'] %}"
    "{% else %}{% set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') %}{% endif %}"
    "{% set messages = messages[1:] %}"
    "{% endif %}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if loop.first and ns.system %}{{ ns.system | trim }}\n\n{% endif %}"
    "{% if message['content'] is string %}"
    "{{ message['content'] | trim }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _siglip(image_size: int, patch_size: int) -> dict:
    return dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )


@register_tiny("tiny/gemma3", "vlm", "Gemma3ForConditionalGeneration")
def build_gemma3(dtype: torch.dtype = torch.float32) -> TinyVLM:
    """Gemma 3: 16 soft tokens per image; 3 LM layers (sliding, sliding, full), 4 heads, 2 KV heads."""
    tokenizer = gemma_tokenizer(
        ["<start_of_turn>", "<end_of_turn>"],
        boi_token="<start_of_image>",
        eoi_token="<end_of_image>",
        image_token="<image_soft_token>",
        model_max_length=2048,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    image_processor = Gemma3ImageProcessor(
        size={"height": GEMMA3_IMAGE_SIZE, "width": GEMMA3_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=GEMMA3_IMAGE_TOKENS,
    )
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    text_config = dict(
        model_type="gemma3_text",
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(GEMMA3_LAYER_TYPES),
        layer_types=list(GEMMA3_LAYER_TYPES),
        sliding_window=GEMMA3_SLIDING_WINDOW,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        max_position_embeddings=1024,
        **special_token_ids(tokenizer, eos_token_id=[tokenizer.eos_token_id, end_of_turn]),
    )
    config = Gemma3Config(
        text_config=text_config,
        vision_config=_siglip(GEMMA3_IMAGE_SIZE, GEMMA3_PATCH),
        mm_tokens_per_image=GEMMA3_IMAGE_TOKENS,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=True,
    )
    model = Gemma3ForConditionalGeneration(config)
    return TinyVLM(finish_vlm(model, tokenizer, dtype, eos_token_id=[tokenizer.eos_token_id, end_of_turn]), processor)


@register_tiny("tiny/paligemma", "vlm", "PaliGemmaForConditionalGeneration")
def build_paligemma(dtype: torch.dtype = torch.float32) -> TinyVLM:
    """PaliGemma: 16 ``<image>`` tokens per image; 2 Gemma layers, 4 heads, 1 KV head (as PaliGemma)."""
    tokenizer = gemma_tokenizer(image_token="<image>", model_max_length=2048)
    image_processor = SiglipImageProcessor(
        size={"height": PALIGEMMA_IMAGE_SIZE, "width": PALIGEMMA_IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    image_processor.image_seq_length = PALIGEMMA_IMAGE_TOKENS  # PaliGemmaProcessor reads it here
    # adds the 1024 <locXXXX> and 128 <segXXX> tokens; the model's vocabulary covers them
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    hidden_size = 64
    text_config = dict(
        model_type="gemma",
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=1024,
        **special_token_ids(tokenizer),
    )
    config = PaliGemmaConfig(
        text_config=text_config,
        vision_config=_siglip(PALIGEMMA_IMAGE_SIZE, PALIGEMMA_PATCH),
        image_token_index=tokenizer.image_token_id,
        vocab_size=len(tokenizer),
        projection_dim=hidden_size,
        hidden_size=hidden_size,
    )
    return TinyVLM(finish_vlm(PaliGemmaForConditionalGeneration(config), tokenizer, dtype), processor)
