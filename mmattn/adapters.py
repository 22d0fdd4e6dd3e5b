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
    ``second_stage``: (attribute, CFG scale argument) of a second denoiser that runs the later steps (Wan 2.2's
    ``transformer_2`` with ``guidance_scale_2``). ``fork_inputs``: the block arguments that carry the batch, for guidance's fork at the first perturbed block
    (mmattn.guidance); empty: the family runs the whole perturbed branch (a UNet and HunyuanDiT, whose skip
    connections cross blocks).
    ``joint_attention``: the self-attention layers attend over [image, text] together (SoftPAG's block scopes).
    ``linear_attention``: the self-attention is a kernel (linear) attention, not softmax (Sana): no windows.
    ``frames_first``: video latents are (B, F, C, H, W) (CogVideoX), not (B, C, F, H, W). ``grid_inputs``: the
    denoiser arguments that give the token grid (frames, rows, cols) where the latents come packed (LTX-Video), or
    the one argument listing per-sample shapes (Qwen-Image's ``img_shapes``). ``cfg_rescales_to_cond``: the pipeline
    rescales its CFG result to the conditional prediction's norm (Qwen-Image's true CFG), so guidance leaves ε_c as
    it is and moves the uncond call's output instead.
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
    fork_inputs: tuple[str, ...] = ()
    second_stage: tuple[str, str] | None = None
    joint_attention: bool = False
    linear_attention: bool = False
    frames_first: bool = False
    grid_inputs: tuple[str, ...] | None = None
    cfg_rescales_to_cond: bool = False

    def denoiser(self, pipe):
        return getattr(pipe, self.denoiser_attr)

    def denoisers(self, pipe) -> list[tuple[torch.nn.Module, str]]:
        """[(denoiser, the pipeline argument holding its CFG scale)]: the first, and a second stage's where the
        pipeline has one (``second_stage``: its attribute and scale argument; Wan 2.2's ``transformer_2``)."""
        found = [(self.denoiser(pipe), self.cfg_scale)]
        if self.second_stage is not None and getattr(pipe, self.second_stage[0], None) is not None:
            found.append((getattr(pipe, self.second_stage[0]), self.second_stage[1]))
        return found

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
        if self.grid_inputs is not None:  # packed latents (LTX, Qwen-Image): the grid comes with the call
            grid = [inputs.get(name) for name in self.grid_inputs]
            if len(grid) == 1:  # a list of per-sample (frames, rows, cols) shapes, perhaps nested (Qwen-Image)
                grid = grid[0]
                while isinstance(grid, (list, tuple)) and grid and isinstance(grid[0], (list, tuple)):
                    grid = grid[0]
            return None if grid is None or any(x is None for x in grid) else tuple(int(x) for x in grid)
        latent = inputs[self.batched_inputs[0]]
        patch = getattr(denoiser.config, "patch_size", None) or 1
        if latent.ndim == 5:  # (B, C, F, H, W) video latents, or (B, F, C, H, W) where frames_first
            temporal = getattr(denoiser.config, "patch_size_t", None) or 1  # CogVideoX 1.5
            pt, ph, pw = patch if isinstance(patch, (tuple, list)) else (temporal, patch, patch)
            frames = latent.shape[1] if self.frames_first else latent.shape[2]
            return frames // pt, latent.shape[3] // ph, latent.shape[4] // pw
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
                    block_outputs=("encoder_hidden_states", "hidden_states"),
                    fork_inputs=("hidden_states", "encoder_hidden_states", "temb"), joint_attention=True),
    DiffusionFamily("flux", "FluxTransformer2DModel", "transformer", ("FluxTransformerBlock", "FluxSingleTransformerBlock"), "attn",
                    ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
                    cfg_calls="separate", cfg_scale="true_cfg_scale", cfg_needs_negative=True,
                    block_outputs=("encoder_hidden_states", "hidden_states"), text_first=True, image_ids="img_ids",
                    fork_inputs=("hidden_states", "encoder_hidden_states", "temb"), joint_attention=True),
    DiffusionFamily("wan", "WanTransformer3DModel", "transformer", ("WanTransformerBlock",), "attn1",
                    ("hidden_states", "encoder_hidden_states", "timestep", "encoder_hidden_states_image"), cfg_calls="separate",
                    fork_inputs=("hidden_states", "encoder_hidden_states", "temb"),
                    second_stage=("transformer_2", "guidance_scale_2")),
    DiffusionFamily("pixart", "PixArtTransformer2DModel", "transformer", ("BasicTransformerBlock",), "attn1",
                    ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep", "added_cond_kwargs"),
                    fork_inputs=("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                                 "timestep")),
    DiffusionFamily("sana", "SanaTransformer2DModel", "transformer", ("SanaTransformerBlock",), "attn1",
                    ("hidden_states", "encoder_hidden_states", "timestep", "guidance", "encoder_attention_mask",
                     "attention_mask"),
                    fork_inputs=("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
                                 "timestep"), linear_attention=True),
    DiffusionFamily("cogvideox", "CogVideoXTransformer3DModel", "transformer", ("CogVideoXBlock",), "attn1",
                    ("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs"),
                    block_outputs=("hidden_states", "encoder_hidden_states"), text_first=True,
                    fork_inputs=("hidden_states", "encoder_hidden_states", "temb"), joint_attention=True,
                    frames_first=True),
    DiffusionFamily("ltx", "LTXVideoTransformer3DModel", "transformer", ("LTXVideoTransformerBlock",), "attn1",
                    ("hidden_states", "encoder_hidden_states", "timestep", "encoder_attention_mask", "video_coords"),
                    fork_inputs=("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb",
                                 "encoder_attention_mask"),
                    grid_inputs=("num_frames", "height", "width")),
    DiffusionFamily("hunyuandit", "HunyuanDiT2DModel", "transformer", ("HunyuanDiTBlock",), "attn1",
                    ("hidden_states", "timestep", "encoder_hidden_states", "text_embedding_mask",
                     "encoder_hidden_states_t5", "text_embedding_mask_t5", "image_meta_size", "style")),
    DiffusionFamily("qwenimage", "QwenImageTransformer2DModel", "transformer", ("QwenImageTransformerBlock",), "attn",
                    ("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "timestep", "guidance"),
                    cfg_calls="separate", cfg_scale="true_cfg_scale", cfg_needs_negative=True,
                    block_outputs=("encoder_hidden_states", "hidden_states"), text_first=True,
                    fork_inputs=("hidden_states", "encoder_hidden_states", "encoder_hidden_states_mask", "temb"),
                    joint_attention=True, grid_inputs=("img_shapes",), cfg_rescales_to_cond=True),
    DiffusionFamily("hunyuanvideo", "HunyuanVideoTransformer3DModel", "transformer",
                    ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"), "attn",
                    ("hidden_states", "timestep", "encoder_hidden_states", "encoder_attention_mask",
                     "pooled_projections", "guidance"),
                    cfg_calls="separate", cfg_scale="true_cfg_scale", cfg_needs_negative=True,
                    block_outputs=("hidden_states", "encoder_hidden_states"),
                    fork_inputs=("hidden_states", "encoder_hidden_states", "temb", "attention_mask"),
                    joint_attention=True),
)


def diffusion_family(pipe) -> DiffusionFamily:
    for family in DIFFUSION_FAMILIES:
        denoiser = getattr(pipe, family.denoiser_attr, None)
        if denoiser is not None and type(denoiser).__name__ == family.denoiser_class:
            return family
    found = {attr: type(getattr(pipe, attr)).__name__ for attr in ("unet", "transformer") if getattr(pipe, attr, None) is not None}
    supported = ", ".join(f"{f.name} ({f.denoiser_class})" for f in DIFFUSION_FAMILIES)
    raise ValueError(f"{type(pipe).__name__} with denoiser {found or 'none'} is not supported; supported families: {supported}")


@dataclass(frozen=True)
class VLMFamily:
    """How mmattn reaches into one transformers VLM class (``model.model`` is its core).

    ``text_model``: the core's attribute holding the decoder (its ``.layers``). ``video``: the model has video
    frame tokens (``config.video_token_id``) that pruning treats as image tokens. Encoder-side scoring (VisionZip):
    ``vision_layers`` is the core's path to the vision tower's layers and ``vision_attention`` each layer's
    attention attribute; the scoring layer is ``config.vision_feature_layer`` where ``feature_layer_from_config``
    (LLaVA), else the last. ``vision_scores`` is "cls" (the [CLS] query's probabilities) or "received" (attention
    each patch receives); ``to_tokens`` names how patch scores map onto LLM image tokens as the projector maps
    features: "drop_cls", "flat", "avg_pool" (Gemma 3), "pixel_shuffle" (SmolVLM / Idefics3), "merge" (Qwen2-VL's
    2x2 groups), "merge_unwindowed" (Qwen2.5-VL: the same, out of the tower's window order), "anyres" (LLaVA-OneVision:
    base tile, unpadded tile grid, row newlines); ``video_to_tokens`` the same for video tokens ("pooled_frames":
    LLaVA-OneVision's pooled frames); None: video tokens are not scored there. No ``vision_scores``: encoder-side
    scoring is not supported.
    """

    name: str
    text_model: str = "language_model"
    video: bool = False
    vision_layers: str | None = None
    vision_attention: str = "self_attn"
    feature_layer_from_config: bool = False
    vision_scores: str | None = None
    to_tokens: str | None = None
    video_to_tokens: str | None = None

    def text_layers(self, model) -> torch.nn.ModuleList:
        return getattr(model.model, self.text_model).layers

    def vision_layer_list(self, model) -> torch.nn.ModuleList:
        module = model.model
        for part in self.vision_layers.split("."):
            module = getattr(module, part)
        return module


VLM_FAMILIES = (
    VLMFamily("LlavaForConditionalGeneration", vision_layers="vision_tower.encoder.layers",
              feature_layer_from_config=True, vision_scores="cls", to_tokens="drop_cls"),
    VLMFamily("LlavaOnevisionForConditionalGeneration", video=True, vision_layers="vision_tower.encoder.layers",
              feature_layer_from_config=True, vision_scores="received", to_tokens="anyres",
              video_to_tokens="pooled_frames"),
    VLMFamily("Qwen2VLForConditionalGeneration", video=True, vision_layers="visual.blocks", vision_attention="attn",
              vision_scores="received", to_tokens="merge", video_to_tokens="merge"),
    VLMFamily("Qwen2_5_VLForConditionalGeneration", video=True, vision_layers="visual.blocks", vision_attention="attn",
              vision_scores="received", to_tokens="merge_unwindowed", video_to_tokens="merge_unwindowed"),
    VLMFamily("Gemma3ForConditionalGeneration", vision_layers="vision_tower.encoder.layers", vision_scores="received",
              to_tokens="avg_pool"),
    VLMFamily("PaliGemmaForConditionalGeneration", vision_layers="vision_tower.encoder.layers",
              vision_scores="received", to_tokens="flat"),
    VLMFamily("SmolVLMForConditionalGeneration", text_model="text_model", vision_layers="vision_model.encoder.layers",
              vision_scores="received", to_tokens="pixel_shuffle"),
    VLMFamily("Idefics3ForConditionalGeneration", text_model="text_model", vision_layers="vision_model.encoder.layers",
              vision_scores="received", to_tokens="pixel_shuffle"),
)


def supported_vlms(encoder_side: bool = False) -> tuple[str, ...]:
    """Class names of the VLM families (with encoder-side scoring only, when ``encoder_side``)."""
    return tuple(f.name for f in VLM_FAMILIES if not encoder_side or f.vision_scores is not None)


def vlm_family(model, method: str, encoder_side: bool = False) -> VLMFamily:
    """The family of ``model`` by its class; ``method`` names the caller in the error for an unsupported model."""
    name = type(model).__name__
    for family in VLM_FAMILIES:
        if family.name == name and (not encoder_side or family.vision_scores is not None):
            return family
    raise ValueError(f"{method} does not support {name}; supported models: {', '.join(supported_vlms(encoder_side))}")
