"""Tiny LLaVA-family models: ``tiny/llava`` (LLaVA-1.5) and ``tiny/llava-onevision``.

Real architecture classes with random weights and real processors whose tokenizers, image processors
and chat templates are built in code; every size is shrunk so that a model builds and generates on a
CPU in a fraction of a second.

* ``tiny/llava``: ``LlavaForConditionalGeneration``, CLIP vision tower (64 px images, 8 px patches, CLS
  dropped by ``vision_feature_select_strategy="default"`` from layer -2) -> 2-layer GELU projector ->
  Llama text model (GQA). 64 ``<image>`` tokens per image.
* ``tiny/llava-onevision``: ``LlavaOnevisionForConditionalGeneration``, SigLIP vision tower (32 px tiles,
  8 px patches: 16 features per tile) -> projector -> Qwen2 text model (GQA). AnyRes over grids of up to
  2x2 tiles: 16 (base tile) + up to 64 (grid features left after unpadding) + one newline per grid row,
  so at most 88 ``<image>`` tokens for an image alone in its prompt (a 64x48 (WxH) image gives 70), and 17 per
  image when several share a prompt; videos are pooled 2x2 to 4 tokens per frame, plus one newline.
"""

from __future__ import annotations

import torch

from . import TinyVLM, register_tiny
from ._vlm import finish_vlm, special_token_ids
from .tokenizers import llama_tokenizer, qwen2_tokenizer

__all__ = ["build_llava", "build_llava_onevision", "LLAVA_CHAT_TEMPLATE", "LLAVA_ONEVISION_CHAT_TEMPLATE"]

# LLaVA-1.5 conversation format: "USER: <image>\nWhat is this? ASSISTANT: It is a cat.</s>USER: ..."
LLAVA_CHAT_TEMPLATE = (
    r"{%- for message in messages -%}"
    r"{%- if message['role'] == 'system' -%}"
    r"{%- if message['content'] is string -%}{{- message['content'] + ' ' -}}"
    r"{%- else -%}{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] + ' ' -}}"
    r"{%- endfor -%}{%- endif -%}"
    r"{%- else -%}"
    r"{{- message['role'] | upper + ': ' -}}"
    r"{%- if message['content'] is string -%}{{- message['content'] -}}"
    r"{%- else -%}"
    r"{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>\n' -}}{%- endfor -%}"
    r"{%- for item in message['content'] if item['type'] == 'text' -%}{{- item['text'] -}}{%- endfor -%}"
    r"{%- endif -%}"
    r"{{- '</s>' if message['role'] == 'assistant' else ' ' -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)

# LLaVA-OneVision (Qwen2 ChatML): "<|im_start|>user <image>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n"
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    r"{%- for message in messages -%}"
    r"{{- '<|im_start|>' + message['role'] + ' ' -}}"
    r"{%- if message['content'] is string -%}{{- message['content'] -}}"
    r"{%- else -%}"
    r"{%- for item in message['content'] if item['type'] == 'image' -%}{{- '<image>' -}}{%- endfor -%}"
    r"{%- for item in message['content'] if item['type'] == 'video' -%}{{- '<video>' -}}{%- endfor -%}"
    r"{%- for item in message['content'] if item['type'] == 'text' -%}"
    r"{{- '\n' + item['text'] -}}"
    r"{%- endfor -%}"
    r"{%- endif -%}"
    r"{{- '<|im_end|>\n' -}}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

_QWEN2_CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")

# Shared sizes of the tiny text models.
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@register_tiny(
    "tiny/llava",
    "vlm",
    "LlavaForConditionalGeneration",
    defaults={"max_new_tokens": 8, "do_sample": False},
)
def build_llava(dtype: torch.dtype = torch.float32) -> TinyVLM:
    """LLaVA-1.5: CLIP ViT (2 layers, features of layer -2 without CLS) + MLP projector + Llama (GQA)."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    image_size, patch_size = 64, 8
    tokenizer = llama_tokenizer(image_token="<image>", pad_token="<pad>", chat_template=LLAVA_CHAT_TEMPLATE)

    vision_config = CLIPVisionConfig(
        **_VISION, image_size=image_size, patch_size=patch_size, projection_dim=32, hidden_act="quick_gelu"
    )
    text_config = LlamaConfig(
        **_TEXT,
        vocab_size=len(tokenizer),
        hidden_act="silu",
        rms_norm_eps=1e-5,
        **special_token_ids(tokenizer),
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        attn_implementation="sdpa",
    )
    config.pad_token_id = tokenizer.pad_token_id
    model = finish_vlm(LlavaForConditionalGeneration(config), tokenizer, dtype)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped again by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token="<image>",
    )
    return TinyVLM(model, processor)


@register_tiny(
    "tiny/llava-onevision",
    "vlm",
    "LlavaOnevisionForConditionalGeneration",
    defaults={"max_new_tokens": 8, "do_sample": False},
)
def build_llava_onevision(dtype: torch.dtype = torch.float32) -> TinyVLM:
    """LLaVA-OneVision: SigLIP ViT (2 layers) + projector + Qwen2 (GQA), AnyRes images and pooled video."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tile, patch_size = 32, 8
    grid_pinpoints = [[tile * h, tile * w] for h in (1, 2) for w in (1, 2)]
    tokenizer = qwen2_tokenizer(
        _QWEN2_CHAT_TOKENS,
        image_token="<image>",
        video_token="<video>",
        eos_token="<|im_end|>",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")

    vision_config = SiglipVisionConfig(
        **_VISION,
        image_size=tile,
        patch_size=patch_size,
        hidden_act="gelu_pytorch_tanh",
        vision_use_head=False,
    )
    text_config = Qwen2Config(
        **_TEXT,
        vocab_size=len(tokenizer),
        hidden_act="silu",
        rms_norm_eps=1e-6,
        **special_token_ids(tokenizer, bos_token_id=endoftext),
        tie_word_embeddings=False,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.video_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=grid_pinpoints,
        vision_aspect_ratio="anyres_max_9",
        attn_implementation="sdpa",
    )
    config.pad_token_id = tokenizer.pad_token_id
    model = LlavaOnevisionForConditionalGeneration(config)
    model = finish_vlm(model, tokenizer, dtype, bos_token_id=endoftext, eos_token_id=[tokenizer.eos_token_id, endoftext])

    image_processor = LlavaOnevisionImageProcessor(
        size={"height": tile, "width": tile}, image_grid_pinpoints=grid_pinpoints, do_pad=True
    )
    video_processor = LlavaOnevisionVideoProcessor(size={"height": tile, "width": tile})
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=(tile // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
    )
    return TinyVLM(model, processor)
