"""Model-family adapters: where a family keeps its denoiser, its attention layers and its batched inputs.

Processors know one family each through these descriptors; ``diffusion_family(pipe)`` picks the
descriptor by the denoiser's class and fails with the list of supported families otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiffusionFamily:
    """How mmattn reaches into one diffusers denoiser class.

    ``batched_inputs`` are the denoiser arguments with a batch dimension, the latent input first
    (dicts of tensors, as SDXL's ``added_cond_kwargs``, are expanded entry by entry).
    ``cfg_calls`` is "batched" when the pipeline runs [uncond, cond] in one forward, "separate"
    when it calls the denoiser for cond first and then for uncond (Wan).
    """

    name: str
    denoiser_class: str
    denoiser_attr: str
    block_types: tuple[str, ...]
    self_attention: str
    batched_inputs: tuple[str, ...]
    cfg_calls: str = "batched"

    def denoiser(self, pipe):
        return getattr(pipe, self.denoiser_attr)

    def attention_layers(self, denoiser) -> dict[str, object]:
        """{block name as diffusers prints it: the block's self-attention module}, in model order."""
        return {name: getattr(module, self.self_attention) for name, module in denoiser.named_modules()
                if type(module).__name__ in self.block_types}


DIFFUSION_FAMILIES = (
    DiffusionFamily("unet", "UNet2DConditionModel", "unet", ("BasicTransformerBlock",), "attn1",
                    ("sample", "encoder_hidden_states", "timestep", "timestep_cond", "added_cond_kwargs")),
    DiffusionFamily("sd3", "SD3Transformer2DModel", "transformer", ("JointTransformerBlock",), "attn",
                    ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")),
    DiffusionFamily("flux", "FluxTransformer2DModel", "transformer", ("FluxTransformerBlock", "FluxSingleTransformerBlock"), "attn",
                    ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")),
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
