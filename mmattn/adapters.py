"""Model-family adapters: where a family keeps its denoiser, its attention layers and its batched inputs.

Processors know one family each through these descriptors; ``diffusion_family(pipe)`` picks the
descriptor by the denoiser's class and fails with the list of supported families otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DiffusionFamily:
    """How mmattn reaches into one diffusers denoiser class.

    ``batched_inputs`` are the denoiser arguments with a batch dimension, the latent input first
    (dicts of tensors, as SDXL's ``added_cond_kwargs``, are expanded entry by entry).
    ``cfg_calls`` is "batched" when the pipeline runs [uncond, cond] in one forward, "separate"
    when it calls the denoiser for cond first and then for uncond (Wan; Flux's true CFG). ``cfg_scale``
    is the pipeline argument holding w; ``cfg_needs_negative``: CFG runs only with a negative prompt
    (Flux: ``true_cfg_scale > 1`` and ``negative_prompt`` or ``negative_prompt_embeds``). ``block_outputs`` names
    what a block returns, in order; ``text_first`` says joint sequences put text before image.
    Token layout: the image-token grid comes from the input ``image_ids`` names (Flux's ``img_ids``:
    (row, col) per token) or else from the latent's shape and the denoiser's patch size;
    ``grid_factors`` are the resolutions below it that attention layers see (a UNet's down blocks).
    """

    name: str
    denoiser_class: str
    denoiser_attr: str
    block_types: tuple[str, ...]
    self_attention: str
    batched_inputs: tuple[str, ...]
    cfg_calls: str = "batched"
    cfg_scale: str = "guidance_scale"
    cfg_needs_negative: bool = False
    block_outputs: tuple[str, ...] = ("hidden_states",)
    text_first: bool = False
    image_ids: str | None = None
    grid_factors: tuple[int, ...] = (1,)

    def denoiser(self, pipe):
        return getattr(pipe, self.denoiser_attr)

    def blocks(self, denoiser) -> dict[str, torch.nn.Module]:
        """{block name as diffusers prints it: block}, in model order."""
        return {name: module for name, module in denoiser.named_modules() if type(module).__name__ in self.block_types}

    def token_grid(self, denoiser, inputs: dict) -> tuple[int, int, int] | None:
        """(frames, rows, cols) of the image tokens at the denoiser's first token resolution."""
        if self.image_ids is not None:
            ids = inputs.get(self.image_ids)
            if ids is None:
                return None
            ids = ids[0] if ids.ndim == 3 else ids
            return 1, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        latent = inputs[self.batched_inputs[0]]
        patch = getattr(denoiser.config, "patch_size", None) or 1
        if latent.ndim == 5:  # (B, C, F, H, W) video latents
            pt, ph, pw = patch if isinstance(patch, (tuple, list)) else (1, patch, patch)
            return latent.shape[2] // pt, latent.shape[3] // ph, latent.shape[4] // pw
        return 1, latent.shape[2] // patch, latent.shape[3] // patch

    def attention_layers(self, denoiser) -> dict[str, object]:
        """{block name as diffusers prints it: the block's self-attention module}, in model order."""
        return {name: getattr(block, self.self_attention) for name, block in self.blocks(denoiser).items()}


DIFFUSION_FAMILIES = (
    DiffusionFamily("unet", "UNet2DConditionModel", "unet", ("BasicTransformerBlock",), "attn1",
                    ("sample", "encoder_hidden_states", "timestep", "timestep_cond", "added_cond_kwargs"),
                    grid_factors=(1, 2, 4, 8)),
    DiffusionFamily("sd3", "SD3Transformer2DModel", "transformer", ("JointTransformerBlock",), "attn",
                    ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
                    block_outputs=("encoder_hidden_states", "hidden_states")),
    DiffusionFamily("flux", "FluxTransformer2DModel", "transformer", ("FluxTransformerBlock", "FluxSingleTransformerBlock"), "attn",
                    ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
                    cfg_calls="separate", cfg_scale="true_cfg_scale", cfg_needs_negative=True,
                    block_outputs=("encoder_hidden_states", "hidden_states"), text_first=True, image_ids="img_ids"),
    DiffusionFamily("wan", "WanTransformer3DModel", "transformer", ("WanTransformerBlock",), "attn1",
                    ("hidden_states", "encoder_hidden_states", "timestep", "encoder_hidden_states_image"), cfg_calls="separate"),
    DiffusionFamily("pixart", "PixArtTransformer2DModel", "transformer", ("BasicTransformerBlock",), "attn1",
                    ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep", "added_cond_kwargs")),
)


def diffusion_family(pipe) -> DiffusionFamily:
    for family in DIFFUSION_FAMILIES:
        denoiser = getattr(pipe, family.denoiser_attr, None)
        if denoiser is not None and type(denoiser).__name__ == family.denoiser_class:
            return family
    found = {attr: type(getattr(pipe, attr)).__name__ for attr in ("unet", "transformer") if getattr(pipe, attr, None) is not None}
    supported = ", ".join(f"{f.name} ({f.denoiser_class})" for f in DIFFUSION_FAMILIES)
    raise ValueError(f"{type(pipe).__name__} with denoiser {found or 'none'} is not supported; supported families: {supported}")
