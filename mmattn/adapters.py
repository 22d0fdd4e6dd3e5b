"""Model-family adapters: where a family keeps its denoiser, its attention layers and its batched inputs.

Processors know one family each through these descriptors; ``diffusion_family(pipe)`` picks the
descriptor by the denoiser's class and fails with the list of supported families otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiffusionFamily:
    """How mmattn reaches into one diffusers denoiser class."""

    name: str
    denoiser_class: str
    denoiser_attr: str
    block_lists: tuple[str, ...]
    self_attention: str
    batched_inputs: tuple[str, ...]

    def denoiser(self, pipe):
        return getattr(pipe, self.denoiser_attr)

    def attention_layers(self, denoiser) -> dict[str, object]:
        """{block name as diffusers prints it: its self-attention module}, in model order."""
        layers = {}
        for list_name in self.block_lists:
            for i, block in enumerate(getattr(denoiser, list_name, ())):
                layers[f"{list_name}.{i}"] = getattr(block, self.self_attention)
        return layers


DIFFUSION_FAMILIES = (
    DiffusionFamily(
        name="sd3",
        denoiser_class="SD3Transformer2DModel",
        denoiser_attr="transformer",
        block_lists=("transformer_blocks",),
        self_attention="attn",
        batched_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
    ),
)


def diffusion_family(pipe) -> DiffusionFamily:
    for family in DIFFUSION_FAMILIES:
        denoiser = getattr(pipe, family.denoiser_attr, None)
        if denoiser is not None and type(denoiser).__name__ == family.denoiser_class:
            return family
    found = {attr: type(getattr(pipe, attr)).__name__ for attr in ("unet", "transformer") if getattr(pipe, attr, None) is not None}
    supported = ", ".join(f"{f.name} ({f.denoiser_class})" for f in DIFFUSION_FAMILIES)
    raise ValueError(f"{type(pipe).__name__} with denoiser {found or 'none'} is not supported; supported families: {supported}")
