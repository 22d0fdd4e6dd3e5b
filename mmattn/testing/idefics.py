"""Tiny SmolVLM / Idefics3 models: a SigLIP-style tower over image tiles, pixel shuffle, a Llama LM.

The processor splits an image into square tiles of ``TILE`` pixels plus a downscaled global view,
and writes each image as its tiled span::

    <fake_token_around_image><row_1_col_1><image>*9 <fake_token_around_image><row_1_col_2><image>*9 \\n
    \\n<fake_token_around_image><global-img><image>*9 <fake_token_around_image>

Every image is first resized so that its longest edge is ``2 * TILE`` pixels, so a square image
gives 2 x 2 tiles + the global view (45 image tokens), a 2:1 landscape image 1 x 2 tiles + the
global view (27 image tokens), a 1:2 portrait one 2 x 1 tiles + the global view (27 tokens). Each
tile is 48 x 48 pixels, 6 x 6 patches of 8 pixels, pixel-shuffled by 2 into 3 x 3 = 9 tokens.
"""

from __future__ import annotations

import importlib.util

import torch
from transformers import (
    GPT2Tokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessor,
)

from . import TinyVLM, register_tiny
from ._vlm import finish_vlm, special_token_ids
from .tokenizers import byte_level_vocab

__all__ = [
    "TILE",
    "PATCH",
    "SCALE_FACTOR",
    "TOKENS_PER_TILE",
    "MAX_TILES_PER_SIDE",
    "SMOLVLM_CHAT_TEMPLATE",
    "build_smolvlm",
    "build_idefics3",
    "smolvlm_tokenizer",
]

TILE = 48  # side of a tile (and of the global view) in pixels: the vision tower's image_size
PATCH = 8  # vision patch size: 6 x 6 patches per tile
SCALE_FACTOR = 2  # pixel-shuffle factor: 36 patches -> 9 tokens
TOKENS_PER_TILE = ((TILE // PATCH) // SCALE_FACTOR) ** 2
MAX_TILES_PER_SIDE = 2  # images are resized to a longest edge of MAX_TILES_PER_SIDE * TILE

# The row/col tags the real vocabularies carry (Idefics3Processor looks up a 6 x 6 grid).
_ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
_SPECIAL_TOKENS = [
    "<|endoftext|>",  # unk
    "<|im_start|>",  # bos
    "<|im_end|>",  # pad
    "<end_of_utterance>",  # eos: ends every turn
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *_ROW_COL_TOKENS,
]

# "User:<image>What is this?<end_of_utterance>\nAssistant:", the layout of the SmolVLM/Idefics3
# instruct checkpoints. The tokenizer adds no BOS: the template writes it.
SMOLVLM_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}"
    " {{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}"
    "<image>"
    "{% elif part['type'] == 'text' %}"
    "{% if loop.first %} {% endif %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def smolvlm_tokenizer() -> GPT2Tokenizer:
    """Byte-level BPE tokenizer (the SmolLM2 kind) with SmolVLM's special tokens; no BOS added."""
    return GPT2Tokenizer(
        vocab=byte_level_vocab(_SPECIAL_TOKENS),
        merges=[],
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        extra_special_tokens=_SPECIAL_TOKENS[4:],
        # named tokens the SmolVLM / Idefics3 processors read off the tokenizer
        fake_image_token="<fake_token_around_image>",
        image_token="<image>",
        global_image_token="<global-img>",
        end_of_utterance_token="<end_of_utterance>",
        padding_side="left",
        model_max_length=2048,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )


def _image_processor_kwargs() -> dict:
    return dict(
        size={"longest_edge": MAX_TILES_PER_SIDE * TILE},
        max_image_size={"longest_edge": TILE},
        do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def _config_kwargs(tokenizer) -> dict:
    vocab_size = len(tokenizer)
    text_config = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        **special_token_ids(tokenizer),
    )
    vision_config = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=TILE,
        patch_size=PATCH,
    )
    return dict(
        text_config=text_config,
        vision_config=vision_config,
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def is_num2words_available() -> bool:
    return importlib.util.find_spec("num2words") is not None


def _smolvlm_processor(tokenizer):
    image_processor = SmolVLMImageProcessor(**_image_processor_kwargs())
    if not is_num2words_available():
        # SmolVLMProcessor refuses to start without `num2words` (it spells out video frame counts).
        # Idefics3Processor writes the same image spans, so images work the same without it.
        return Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=TOKENS_PER_TILE,
            chat_template=SMOLVLM_CHAT_TEMPLATE,
        )
    from transformers import SmolVLMProcessor, SmolVLMVideoProcessor

    video_processor = SmolVLMVideoProcessor(
        size={"longest_edge": MAX_TILES_PER_SIDE * TILE},
        max_image_size={"longest_edge": TILE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        video_sampling={"max_frames": 4, "fps": 1, "video_size": {"longest_edge": TILE}},
    )
    return SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        image_seq_len=TOKENS_PER_TILE,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )


@register_tiny("tiny/smolvlm", "vlm", "SmolVLMForConditionalGeneration")
def build_smolvlm(dtype: torch.dtype = torch.float32) -> TinyVLM:
    """SmolVLM: tiled images (9 tokens per 48 px tile), Llama LM with 2 layers, 4 heads, 2 KV heads.

    The processor is SmolVLMProcessor (Idefics3Processor if `num2words` is not installed).
    """
    tokenizer = smolvlm_tokenizer()
    processor = _smolvlm_processor(tokenizer)
    config = SmolVLMConfig(**_config_kwargs(tokenizer))
    model = SmolVLMForConditionalGeneration(config)
    return TinyVLM(finish_vlm(model, tokenizer, dtype), processor)


@register_tiny("tiny/idefics3", "vlm", "Idefics3ForConditionalGeneration")
def build_idefics3(dtype: torch.dtype = torch.float32) -> TinyVLM:
    """Idefics3: the same tiny layout as ``tiny/smolvlm`` with the Idefics3 classes."""
    tokenizer = smolvlm_tokenizer()
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(**_image_processor_kwargs()),
        tokenizer=tokenizer,
        image_seq_len=TOKENS_PER_TILE,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    config = Idefics3Config(**_config_kwargs(tokenizer))
    model = Idefics3ForConditionalGeneration(config)
    return TinyVLM(finish_vlm(model, tokenizer, dtype), processor)
