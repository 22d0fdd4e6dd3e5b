"""Every upstream internal mmattn touches, in one place, with the versions each was checked on.

transformers and diffusers move their internals between minor releases (transformers 5.24 renamed the
decoder layers' ``past_key_values`` keyword to ``cache``). Processors, pipelines and the CLI import what
they need of transformers' and diffusers' private modules from here and nowhere else; a test greps for it.
When a new release moves something, the fix is one line here and a note of the version. (One fix cannot live
here: transformers 5.25 imports Hugging Face's ``kernels`` package, a name the repository's kernels/ folder
takes when Python runs from the repository root; kernels/__init__.py hands that name over.)

``tested_range()`` is the range CI tests (the bounds in pyproject.toml); ``check_versions()`` warns once,
from ``mmattn.apply``, when an installed version lies outside it.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import warnings

# transformers: attention and mask implementations (checked on 5.23.0, 5.24.0 and 5.25.0).
from transformers import AttentionInterface  # noqa: F401  (public; re-exported beside its mask twin)
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: F401  (5.23.0 to 5.25.0)
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask  # noqa: F401  (5.23.0 to 5.25.0)
from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: F401  (5.23.0 to 5.25.0)
from transformers.vision_utils import get_vision_window_index  # noqa: F401  (5.23.0 to 5.25.0)

# diffusers: the attention call and rotary embedding the mirrored processors use (checked on 0.42.0 and 0.42.1).
from diffusers.models.attention_dispatch import dispatch_attention_fn  # noqa: F401  (0.42.0, 0.42.1)
from diffusers.models.embeddings import apply_rotary_emb  # noqa: F401  (0.42.0, 0.42.1)
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb as ltx_rotary  # noqa: F401  (0.42.0, 0.42.1)
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen  # noqa: F401  (0.42.0, 0.42.1)

UPSTREAM = ("transformers", "diffusers")  # the libraries whose internals we touch

# Decoder-layer keywords the pruning hooks read and rewrite (checked on 5.23.0, 5.24.0 and 5.25.0).
CACHE_KEYWORDS = ("cache", "past_key_values")  # 5.24 renamed past_key_values -> cache (alias until 5.40)
POSITION_EMBEDDINGS = "position_embeddings"  # (cos, sin), 5.23.0 to 5.25.0
POSITION_IDS = "position_ids"  # 5.23.0 to 5.25.0
ATTENTION_MASK = "attention_mask"  # 5.23.0 to 5.25.0

# diffusers processors that mmattn's processors mirror, by family: class name in diffusers (0.42.0, 0.42.1).
MIRRORED_PROCESSORS = {
    "unet": ("diffusers.models.attention_processor", "AttnProcessor2_0"),
    "pixart": ("diffusers.models.attention_processor", "AttnProcessor2_0"),
    "sd3": ("diffusers.models.attention_processor", "JointAttnProcessor2_0"),
    "flux": ("diffusers.models.transformers.transformer_flux", "FluxAttnProcessor"),
    "wan": ("diffusers.models.transformers.transformer_wan", "WanAttnProcessor"),
    "sana": ("diffusers.models.attention_processor", "SanaLinearAttnProcessor2_0"),
    "cogvideox": ("diffusers.models.attention_processor", "CogVideoXAttnProcessor2_0"),
    "ltx": ("diffusers.models.transformers.transformer_ltx", "LTXVideoAttnProcessor"),
    "hunyuandit": ("diffusers.models.attention_processor", "HunyuanAttnProcessor2_0"),
    "qwenimage": ("diffusers.models.transformers.transformer_qwenimage", "QwenDoubleStreamAttnProcessor2_0"),
    "hunyuanvideo": ("diffusers.models.transformers.transformer_hunyuan_video", "HunyuanVideoAttnProcessor2_0"),
}


def mirrored_processor(family: str) -> type:
    """diffusers' processor class that mmattn's processor for ``family`` mirrors."""
    import importlib

    module, name = MIRRORED_PROCESSORS[family]
    return getattr(importlib.import_module(module), name)


def call_parameters(processor: type) -> list[str]:
    """The parameter names of a processor class's ``__call__`` (without ``self``)."""
    return list(inspect.signature(processor.__call__).parameters)[1:]


def cache_argument(kwargs: dict):
    """The cache a model or decoder layer forward was given: ``cache`` (>= 5.24) or ``past_key_values`` (<= 5.23)."""
    for name in CACHE_KEYWORDS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(output):
    """The cache a model forward returned: ``output.cache`` (>= 5.24) or ``output.past_key_values`` (<= 5.23)."""
    for name in CACHE_KEYWORDS:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


def cache_length(cache) -> int:
    """Tokens a cache has seen (``Cache.get_seq_length()``, 5.23.0 to 5.25.0)."""
    return cache.get_seq_length()


def stored_keys(cache, layer_idx: int) -> int:
    """Keys the cache holds for decoder layer ``layer_idx`` (``cache.layers[i].keys``, (B, H, N, D); 5.23.0 to
    5.25.0)."""
    keys = getattr(cache.layers[layer_idx], "keys", None)
    return 0 if keys is None else keys.shape[-2]


def anyres_tile_counts(config, image_sizes, batch_num_images) -> list[int]:
    """Tiles LLaVA-OneVision's tower sees per image (base tile included), as its ``get_image_features`` counts them:
    one for an image of a multi-image sample (5.23.0 to 5.25.0)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    tiled = [True] * len(image_sizes) if batch_num_images is None else \
        [n == 1 for n in batch_num_images for _ in range(n)]
    return [image_size_to_num_patches(image_size=size, grid_pinpoints=config.image_grid_pinpoints,
                                      patch_size=config.vision_config.image_size) if tile else 1
            for size, tile in zip(image_sizes, tiled)]


def cached_keys(cache, layer_idx: int):
    """The keys (B, H, N, D) the cache holds for decoder layer ``layer_idx`` (``cache.layers[i].keys``; 5.23.0 to
    5.25.0)."""
    return cache.layers[layer_idx].keys


def count_extra_tokens(cache, layer_idx: int, extra: int) -> None:
    """Make layer ``layer_idx`` of ``cache`` report ``extra`` more tokens than it stores: transformers reads the
    tokens seen so far (decode positions, generate()'s new ids) from layer 0's ``get_seq_length`` (5.23.0 to 5.25.0)."""
    layer = cache.layers[layer_idx]
    stored = type(layer).get_seq_length
    layer.get_seq_length = lambda *args: stored(layer, *args) + extra


def query_key(attention, hidden_states, position_embeddings):
    """(query (B, H, N, D), key (B, Hkv, N, D)) that a transformers decoder attention module computes from its
    normed input ``hidden_states``: ``q_proj`` / ``k_proj``, its per-head ``q_norm`` / ``k_norm`` where it has them
    (Gemma 3), then its own module's ``apply_rotary_pos_emb`` with ``position_embeddings`` (cos, sin); checked on
    Llama, Qwen2, Qwen2-VL, Qwen2.5-VL, Gemma 3 (5.23.0 to 5.25.0)."""
    import sys

    shape = (*hidden_states.shape[:-1], -1, attention.head_dim)
    query = attention.q_proj(hidden_states).view(shape).transpose(1, 2)
    key = attention.k_proj(hidden_states).view(shape).transpose(1, 2)
    if getattr(attention, "q_norm", None) is not None:
        query, key = attention.q_norm(query), attention.k_norm(key)
    cos, sin = position_embeddings
    return sys.modules[type(attention).__module__].apply_rotary_pos_emb(query, key, cos, sin)


def quiet_upstream_logging() -> None:
    """Only errors from transformers' and diffusers' loggers (the CLI's output stays readable)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def tested_range() -> dict[str, str]:
    """{library: the version specifier CI tests}, from mmattn's own requirements (pyproject.toml)."""
    from packaging.requirements import Requirement

    try:
        requires = importlib.metadata.requires("mmattn") or []
    except importlib.metadata.PackageNotFoundError:  # a source tree that was not installed
        return {}
    ranges = {}
    for line in requires:
        requirement = Requirement(line)
        if requirement.name in UPSTREAM and requirement.marker is None:
            ranges[requirement.name] = str(requirement.specifier)
    return ranges


_checked = False


def check_versions() -> None:
    """Warn once per process when transformers or diffusers lies outside the range CI tests."""
    global _checked
    if _checked:
        return
    _checked = True
    from packaging.specifiers import SpecifierSet

    for name, spec in tested_range().items():
        installed = importlib.metadata.version(name)
        if not SpecifierSet(spec).contains(installed, prereleases=True):
            warnings.warn(f"mmattn is tested with {name}{spec}; {name} {installed} is installed. Methods may fail "
                          "or differ where upstream internals moved (see mmattn/_compat.py).", stacklevel=3)
