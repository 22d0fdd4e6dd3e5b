"""What every tiny VLM builder does last: token ids from the tokenizer, generation config, eval on CPU."""

from __future__ import annotations

import torch

# The placeholder ids a VLM config may carry; generate() must never emit them.
_PLACEHOLDER_IDS = ("image_token_id", "video_token_id")


def special_token_ids(tokenizer, **overrides) -> dict:
    """``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` of ``tokenizer``; ``overrides`` win."""
    ids = dict(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return ids | overrides


def finish_vlm(model, tokenizer, dtype: torch.dtype, **overrides):
    """Eval mode, sdpa, CPU, ``dtype``, and greedy generation configs that pad, stop and never emit placeholders.

    Every generation config of the model (SmolVLM's text model has its own) gets the tokenizer's
    bos/eos/pad ids (``overrides`` as in :func:`special_token_ids`) and suppresses the config's image
    and video placeholder ids: a random LM may sample a placeholder, real checkpoints never do, and code
    that locates image tokens by id in the generated sequence must not find any there.
    """
    ids = special_token_ids(tokenizer, **overrides)
    placeholders = (getattr(model.config, name, None) for name in _PLACEHOLDER_IDS)
    suppress = [token_id for token_id in placeholders if token_id is not None]
    for module in model.modules():
        generation_config = getattr(module, "generation_config", None)
        if generation_config is None:
            continue
        for key, value in ids.items():
            setattr(generation_config, key, value)
        generation_config.do_sample = False
        generation_config.suppress_tokens = list(suppress)
    model.set_attn_implementation("sdpa")
    return model.to(device="cpu", dtype=dtype).eval()
