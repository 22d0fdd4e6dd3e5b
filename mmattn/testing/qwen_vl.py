"""Tiny Qwen-VL models: ``tiny/qwen2-vl`` and ``tiny/qwen2.5-vl``.

Real architecture classes with random weights and real processors (``Qwen2VLImageProcessor``,
``Qwen2VLVideoProcessor``, a byte-level ``Qwen2Tokenizer`` with the Qwen special tokens at their usual
relative order, the ChatML chat template), shrunk for a CPU:

* vision tower: 14 px patches, 2x2 spatial merge, 2-frame temporal patches, 2 blocks of width 32
  (Qwen2.5-VL: window attention in block 0 over 56 px windows, full attention in block 1);
* text model: M-RoPE (``mrope_section`` [2, 3, 3] over head_dim 16), 2 layers, 4 query / 2 key-value
  heads (GQA);
* images are resized to between 16 and 64 merged tokens (``min_pixels=16*28*28``,
  ``max_pixels=64*28*28``); videos to 4-16 tokens per pair of frames.
"""

from __future__ import annotations

import torch

from . import TinyVLM, register_tiny
from ._vlm import finish_vlm, special_token_ids
from .tokenizers import qwen2_tokenizer

__all__ = ["build_qwen2_vl", "build_qwen2_5_vl", "QWEN_VL_CHAT_TEMPLATE", "QWEN_VL_SPECIAL_TOKENS"]

# Qwen2-VL's special tokens, in the hub tokenizer's order (after <|endoftext|>).
QWEN_VL_SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# ChatML with a default system prompt; each image/video is <|vision_start|><|image_pad|><|vision_end|>.
QWEN_VL_CHAT_TEMPLATE = (
    r"{%- if messages[0]['role'] != 'system' -%}"
    r"{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' -}}"
    r"{%- endif -%}"
    r"{%- for message in messages -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' -}}"
    r"{%- if message['content'] is string -%}{{- message['content'] -}}"
    r"{%- else -%}"
    r"{%- for item in message['content'] -%}"
    r"{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    r"{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    r"{%- elif item['type'] == 'video' or 'video' in item -%}"
    r"{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    r"{%- elif 'text' in item -%}{{- item['text'] -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- endif -%}"
    r"{{- '<|im_end|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# generate() arguments that suit the tiny models.
_GENERATE_DEFAULTS = {"max_new_tokens": 8, "do_sample": False}

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
_FACTOR = PATCH_SIZE * MERGE_SIZE  # 28 px per merged (LLM) token side
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 16 * _FACTOR**2, 64 * _FACTOR**2
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 4 * _FACTOR**2, 16 * _FACTOR**2

_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    # head_dim 16: mrope_section splits its 8 rotary frequencies into temporal, height, width.
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
    tie_word_embeddings=False,
)


def _build(dtype: torch.dtype, config_cls, model_cls, processor_cls, vision_config: dict) -> TinyVLM:
    """The parts both Qwen-VL generations share: tokenizer, M-RoPE text model, placeholder ids, processors."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    tokenizer = qwen2_tokenizer(
        QWEN_VL_SPECIAL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=QWEN_VL_CHAT_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    endoftext = ids("<|endoftext|>")
    text_config = dict(
        _TEXT,
        rope_parameters=dict(_TEXT["rope_parameters"]),  # the config edits it in place
        vocab_size=len(tokenizer),
        **special_token_ids(tokenizer, bos_token_id=endoftext),
    )
    config = config_cls(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        attn_implementation="sdpa",
    )
    model = finish_vlm(
        model_cls(config), tokenizer, dtype, bos_token_id=endoftext, eos_token_id=[tokenizer.eos_token_id, endoftext]
    )

    common = dict(patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE)
    image_processor = Qwen2VLImageProcessor(min_pixels=IMAGE_MIN_PIXELS, max_pixels=IMAGE_MAX_PIXELS, **common)
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS, cap_pixels_per_frame=False, **common
    )
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    return TinyVLM(model, processor)


@register_tiny("tiny/qwen2-vl", "vlm", "Qwen2VLForConditionalGeneration", defaults=_GENERATE_DEFAULTS)
def build_qwen2_vl(dtype: torch.dtype = torch.float32) -> TinyVLM:
    """Qwen2-VL: ViT with 2D rotary embeddings + 2x2 patch merger, Qwen2 text model with M-RoPE."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    vision_config = dict(
        depth=2,
        embed_dim=32,
        hidden_size=_TEXT["hidden_size"],  # the merger projects to the text width
        mlp_ratio=2,
        num_heads=2,
        hidden_act="quick_gelu",
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
    )
    return _build(dtype, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, vision_config)


@register_tiny("tiny/qwen2.5-vl", "vlm", "Qwen2_5_VLForConditionalGeneration", defaults=_GENERATE_DEFAULTS)
def build_qwen2_5_vl(dtype: torch.dtype = torch.float32) -> TinyVLM:
    """Qwen2.5-VL: windowed-attention ViT (SwiGLU, RMSNorm) + patch merger, Qwen2 text model with M-RoPE."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    vision_config = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        hidden_act="silu",
        out_hidden_size=_TEXT["hidden_size"],
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        # 56 px windows = 2x2 merged tokens (4x4 patches); the real model uses 112 px (4x4 merged tokens)
        # with full attention in every 8th block, here in the last of the two.
        window_size=2 * _FACTOR,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    return _build(dtype, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, vision_config)
