"""Tiny diffusers pipelines (SD 1.x, SDXL, SD3, FLUX.1-dev, Wan 2.1, PixArt-Sigma, Sana, CogVideoX, LTX-Video,
HunyuanDiT, Qwen-Image, HunyuanVideo) with random weights.

Each builder mirrors the real model's architecture and config conventions (block types, latent
channels, VAE scaling/shift factors, schedulers, guidance embedding...) at toy widths, so attention
interventions hook into the same modules as on the real checkpoints. The VAEs downsample by 2 (4 for
Wan) instead of 8, so a 32x32 image still gives the transformers a few dozen image tokens.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLQwenImage,
    AutoencoderKL,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDPMScheduler,
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanDiT2DModel,
    HunyuanDiTPipeline,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    ModelMixin,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    LlamaConfig,
    LlamaModel,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)

from . import register_tiny
from .tokenizers import clip_tokenizer, t5_tokenizer

__all__ = ["build_sd", "build_sdxl", "build_sd3", "build_flux", "build_wan", "build_pixart", "build_sana", "build_cogvideox", "build_ltx", "build_hunyuandit", "build_qwenimage",
           "build_hunyuanvideo"]

# Text sequence length of the T5 encoders (the tokenizer's model_max_length): one token per character.
T5_MAX_LENGTH = 64


def _call_defaults(guidance_scale: float, **extra) -> dict:
    """Pipeline call arguments that suit the tiny models: 32x32 px, 2 denoising steps, then ``extra``."""
    return {"height": 32, "width": 32, "num_inference_steps": 2, "guidance_scale": guidance_scale, **extra}


def _clip_config(hidden_size: int, projection_dim: int | None = None) -> CLIPTextConfig:
    """CLIP text encoder over ``clip_tokenizer()``'s 514 ids, 77 positions, 2 layers."""
    tokenizer = clip_tokenizer()
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim or hidden_size,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_text_model(hidden_size: int) -> CLIPTextModel:
    return CLIPTextModel(_clip_config(hidden_size))


def _clip_text_model_with_projection(hidden_size: int, projection_dim: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(_clip_config(hidden_size, projection_dim))


def _t5_config_kwargs(d_model: int) -> dict:
    """T5 v1.1-style encoder (gated-GELU, relative position buckets) over ``t5_tokenizer()``'s ids."""
    return dict(
        vocab_size=len(t5_tokenizer()),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _t5_encoder(d_model: int) -> T5EncoderModel:
    return T5EncoderModel(T5Config(**_t5_config_kwargs(d_model)))


def _umt5_encoder(d_model: int) -> UMT5EncoderModel:
    return UMT5EncoderModel(UMT5Config(**_t5_config_kwargs(d_model)))


def _vae(latent_channels: int, scaling_factor: float, shift_factor: float | None = None) -> AutoencoderKL:
    """Two-level AutoencoderKL (spatial factor 2); quant convs only for the 4-channel SD-style VAEs."""
    with_quant_conv = latent_channels == 4
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=with_quant_conv,
        use_post_quant_conv=with_quant_conv,
    )


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point weights to ``dtype`` like diffusers' ``from_pretrained(torch_dtype=...)``:
    the modules a diffusers model lists in ``_keep_in_fp32_modules`` (Wan's RoPE, norms...) stay float32."""
    keep_in_fp32 = (model._keep_in_fp32_modules or []) if isinstance(model, ModelMixin) else []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not any(m in name.split(".") for m in keep_in_fp32):
            tensor.data = tensor.data.to(dtype)


def _finish(pipe: DiffusionPipeline, dtype: torch.dtype) -> DiffusionPipeline:
    """Put every model in eval mode (construction leaves them training: T5 dropout) and cast it."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
            _cast(component, dtype)
    return pipe


@register_tiny(
    "tiny/sd",
    kind="image",
    architecture="StableDiffusionPipeline (UNet2DConditionModel, CLIP ViT-L-style text encoder)",
    defaults=_call_defaults(guidance_scale=7.5),
)
def build_sd(dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """SD 1.x layout: cross-attention in every down/up block and in the mid block."""
    text_hidden = 32
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=text_hidden,
        attention_head_dim=4,  # diffusers' legacy name: the number of heads of each block
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(latent_channels=4, scaling_factor=0.18215),
        text_encoder=_clip_text_model(text_hidden),
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe, dtype)


@register_tiny(
    "tiny/sdxl",
    kind="image",
    architecture="StableDiffusionXLPipeline (UNet with text_time conditioning, CLIP-L + CLIP-G)",
    defaults=_call_defaults(guidance_scale=5.0),
)
def build_sdxl(dtype: torch.dtype = torch.float32) -> StableDiffusionXLPipeline:
    """SDXL layout: no attention in the first down block, 2 transformer layers deeper, added text/time embeddings."""
    hidden, projection = 32, 32
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * hidden,  # the two text encoders' states are concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=projection + 6 * 8,  # pooled text + 6 time ids
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(latent_channels=4, scaling_factor=0.13025),
        text_encoder=_clip_text_model(hidden),
        text_encoder_2=_clip_text_model_with_projection(hidden, projection),
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    return _finish(pipe, dtype)


@register_tiny(
    "tiny/sd3",
    kind="image",
    architecture="StableDiffusion3Pipeline (SD3Transformer2DModel MMDiT, CLIP-L + CLIP-G + T5)",
    defaults=_call_defaults(guidance_scale=5.0, max_sequence_length=T5_MAX_LENGTH),
)
def build_sd3(dtype: torch.dtype = torch.float32) -> StableDiffusion3Pipeline:
    """SD3-medium layout: joint attention over [image; CLIP (77) + T5 tokens], 4 blocks of 4 heads x 8."""
    clip_hidden, clip_projection, t5_dim = 32, 32, 64  # the two CLIPs' states are zero-padded to t5_dim
    heads, head_dim = 4, 8
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=4,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * clip_projection,
        pos_embed_max_size=64,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=_clip_text_model_with_projection(clip_hidden, clip_projection),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_clip_text_model_with_projection(clip_hidden, clip_projection),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(t5_dim),
        tokenizer_3=t5_tokenizer(T5_MAX_LENGTH),
    )
    return _finish(pipe, dtype)


@register_tiny(
    "tiny/flux",
    kind="image",
    architecture="FluxPipeline (FluxTransformer2DModel, guidance-distilled like FLUX.1-dev, CLIP-L + T5)",
    defaults=_call_defaults(guidance_scale=3.5, max_sequence_length=T5_MAX_LENGTH),
)
def build_flux(dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """FLUX.1-dev layout: 2 double-stream + 2 single-stream blocks of 4 heads x 16, 3-axis RoPE."""
    clip_hidden, t5_dim = 32, 64
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed in 2x2 patches
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=clip_hidden,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=_clip_text_model(clip_hidden),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_t5_encoder(t5_dim),
        tokenizer_2=t5_tokenizer(T5_MAX_LENGTH),
        transformer=transformer,
    )
    return _finish(pipe, dtype)


@register_tiny(
    "tiny/wan",
    kind="video",
    architecture="WanPipeline (WanTransformer3DModel, Wan 2.1 T2V, causal 3D VAE, UMT5)",
    defaults=_call_defaults(guidance_scale=5.0, num_frames=5, max_sequence_length=T5_MAX_LENGTH),
)
def build_wan(dtype: torch.dtype = torch.float32) -> WanPipeline:
    """Wan 2.1 T2V layout: VAE compresses 4x in space and 2x in time, so 5 frames at 32x32 give
    3 latent frames of 4x4 patches (48 video tokens); 2 blocks of 4 heads x 16."""
    t5_dim = 32
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        scale_factor_spatial=4,
        scale_factor_temporal=2,
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=t5_dim,
        freq_dim=32,
        ffn_dim=128,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = WanPipeline(
        tokenizer=t5_tokenizer(T5_MAX_LENGTH),
        text_encoder=_umt5_encoder(t5_dim),
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
    )
    return _finish(pipe, dtype)


@register_tiny(
    "tiny/pixart",
    kind="image",
    architecture="PixArtSigmaPipeline (PixArtTransformer2DModel, adaLN-single DiT, T5)",
    defaults=_call_defaults(
        guidance_scale=4.5,
        max_sequence_length=T5_MAX_LENGTH,
        use_resolution_binning=False,  # the real bins are 256-2048 px
        clean_caption=False,  # needs beautifulsoup4 and ftfy
    ),
)
def build_pixart(dtype: torch.dtype = torch.float32) -> PixArtSigmaPipeline:
    """PixArt-Sigma layout: self-attention, cross-attention to T5, learned sigma; 2 blocks of 4 heads x 8."""
    t5_dim = 32
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        num_attention_heads=4,
        attention_head_dim=8,
        cross_attention_dim=32,
        caption_channels=t5_dim,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=t5_tokenizer(T5_MAX_LENGTH),
        text_encoder=_t5_encoder(t5_dim),
        vae=_vae(latent_channels=4, scaling_factor=0.13025),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    return _finish(pipe, dtype)


@register_tiny(
    "tiny/sana",
    kind="image",
    architecture="SanaPipeline (SanaTransformer2DModel: ReLU linear self-attention, cross-attention; DC-AE, Gemma 2)",
    defaults=_call_defaults(
        guidance_scale=4.5,
        max_sequence_length=T5_MAX_LENGTH,
        complex_human_instruction=None,  # the real prompt preamble is longer than the tiny tokenizer's 64 tokens
        use_resolution_binning=False,
        clean_caption=False,
    ),
)
def build_sana(dtype: torch.dtype = torch.float32) -> SanaPipeline:
    """Sana layout: linear self-attention (attn1) and softmax cross-attention (attn2) per block, adaLN-single, a
    deep-compression autoencoder (2x here: 32 px give 16x16 latents, 2x2 patches, 64 image tokens), a Gemma 2 text
    encoder (the tiny one reads the T5 tokenizer's ids); 2 blocks of 4 heads x 8."""
    gemma = Gemma2Model(Gemma2Config(vocab_size=t5_tokenizer(T5_MAX_LENGTH).vocab_size, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, head_dim=16, max_position_embeddings=T5_MAX_LENGTH,
                                     attn_implementation="eager"))  # Gemma 2 has no SDPA path
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="conv",
        scaling_factor=0.41407,
    )
    transformer = SanaTransformer2DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=4,
        cross_attention_head_dim=8,
        cross_attention_dim=32,
        caption_channels=32,
        sample_size=16,
        patch_size=2,
    )
    pipe = SanaPipeline(
        tokenizer=t5_tokenizer(T5_MAX_LENGTH),
        text_encoder=gemma,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    return _finish(pipe, dtype)


@register_tiny(
    "tiny/cogvideox",
    kind="video",
    architecture="CogVideoXPipeline (CogVideoXTransformer3DModel: joint [text, video] attention, 3-D RoPE as in "
                 "CogVideoX-5b; CogVideoX VAE, T5)",
    defaults=_call_defaults(guidance_scale=6.0, num_frames=5, max_sequence_length=T5_MAX_LENGTH),
)
def build_cogvideox(dtype: torch.dtype = torch.float32) -> CogVideoXPipeline:
    """CogVideoX-5b layout: text tokens first in every block's joint attention, RoPE on the video tokens, a VAE
    compressing 2x in space and 2x in time here, so 5 frames at 32x32 give 3 latent frames of 8x8 patches (192 video
    tokens); 2 blocks of 4 heads x 16."""
    t5_dim = 32
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 2,
        up_block_types=("CogVideoXUpBlock3D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=2,
    )
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=t5_dim,
        num_layers=2,
        sample_width=16,
        sample_height=16,
        sample_frames=5,
        patch_size=2,
        temporal_compression_ratio=2,
        max_text_seq_length=T5_MAX_LENGTH,
        use_rotary_positional_embeddings=True,
    )
    pipe = CogVideoXPipeline(
        tokenizer=t5_tokenizer(T5_MAX_LENGTH),
        text_encoder=_t5_encoder(t5_dim),
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )
    return _finish(pipe, dtype)


@register_tiny(
    "tiny/ltx",
    kind="video",
    architecture="LTXPipeline (LTXVideoTransformer3DModel: packed video tokens, RoPE; LTX video VAE, T5)",
    defaults=_call_defaults(guidance_scale=3.0, num_frames=9, max_sequence_length=T5_MAX_LENGTH),
)
def build_ltx(dtype: torch.dtype = torch.float32) -> LTXPipeline:
    """LTX-Video layout: the pipeline packs latents into tokens (patch 1), self-attention with RoPE, cross-attention
    to T5; the VAE compresses 4x in space and in time here, so 9 frames at 32x32 give 3 latent frames of 8x8 tokens
    (192); 2 blocks of 4 heads x 8."""
    t5_dim = 32
    transformer = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                             num_attention_heads=4, attention_head_dim=8, cross_attention_dim=32,
                                             num_layers=2, caption_channels=t5_dim)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5_encoder(t5_dim),
        tokenizer=t5_tokenizer(T5_MAX_LENGTH),
        transformer=transformer,
    )
    return _finish(pipe, dtype)


@register_tiny(
    "tiny/hunyuandit",
    kind="image",
    architecture="HunyuanDiTPipeline (HunyuanDiT2DModel: 2-D RoPE, long skip connections; Bert + T5)",
    defaults={**_call_defaults(guidance_scale=5.0, use_resolution_binning=False), "height": 64, "width": 64},
)
def build_hunyuandit(dtype: torch.dtype = torch.float32) -> HunyuanDiTPipeline:
    """HunyuanDiT layout: the pipeline sizes its RoPE grid for an 8x VAE, so this VAE downsamples 8x (64 px give
    8x8 latents, 2x2 patches: 16 image tokens); the second half of the blocks takes long skips from the first;
    a Bert encoder (reading the CLIP tokenizer's ids) and T5 (its 256 tokens); 2 blocks of 4 heads x 8."""
    tokenizer = clip_tokenizer()
    bert = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=77),
                     add_pooling_layer=False)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=64, scaling_factor=0.13025)
    transformer = HunyuanDiT2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=4, in_channels=4, cross_attention_dim=32,
                                    cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=32, text_len=77,
                                    text_len_t5=256)
    pipe = HunyuanDiTPipeline(vae=vae, text_encoder=bert, tokenizer=tokenizer, transformer=transformer,
                              scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None,
                              requires_safety_checker=False, text_encoder_2=_t5_encoder(32),
                              tokenizer_2=t5_tokenizer(256))
    return _finish(pipe, dtype)


@register_tiny(
    "tiny/qwenimage",
    kind="image",
    architecture="QwenImagePipeline (QwenImageTransformer2DModel: joint [text, image] double-stream MMDiT, true CFG; "
                 "Qwen-Image VAE, Qwen2.5-VL text encoder)",
    defaults=_call_defaults(guidance_scale=1.0, true_cfg_scale=3.0, negative_prompt="blurry", max_sequence_length=64),
)
def build_qwenimage(dtype: torch.dtype = torch.float32) -> QwenImagePipeline:
    """Qwen-Image layout: text first in every block's joint attention, RoPE on both streams, true CFG in a separate
    uncond call rescaled to the conditional prediction's norm; the VAE compresses 2x (32 px give 16x16 latents, 2x2
    patches: 64 image tokens), the text encoder is ``tiny/qwen2.5-vl``; 2 blocks of 4 heads x 16."""
    from . import build_tiny

    vlm = build_tiny("tiny/qwen2.5-vl", dtype=dtype)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=4,
                                              joint_attention_dim=vlm.model.config.text_config.hidden_size,
                                              axes_dims_rope=(4, 6, 6))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=vlm.model,
                             tokenizer=vlm.processor.tokenizer, transformer=transformer)
    return _finish(pipe, dtype)


@register_tiny(
    "tiny/hunyuanvideo",
    kind="video",
    architecture="HunyuanVideoPipeline (HunyuanVideoTransformer3DModel: double- and single-stream [video, text] blocks, "
                 "embedded guidance, optional true CFG; HunyuanVideo VAE, Llama + CLIP)",
    defaults=_call_defaults(guidance_scale=6.0, num_frames=9, max_sequence_length=64,
                            prompt_template={"template": "{}", "crop_start": 0}),  # the real template is for Llama's ids
)
def build_hunyuanvideo(dtype: torch.dtype = torch.float32) -> HunyuanVideoPipeline:
    """HunyuanVideo layout: video tokens first in every block's joint attention, RoPE on them; the pipeline reads the
    Llama encoder's third-last hidden state; the VAE compresses 8x in space and 4x in time, so 9 frames at 32x32 give
    3 latent frames of 4x4 tokens (48); 2 double- and 2 single-stream blocks of 4 heads x 16."""
    tokenizer = clip_tokenizer()
    llama = LlamaModel(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=128, attn_implementation="sdpa"))
    vae = AutoencoderKLHunyuanVideo(in_channels=3, out_channels=3, latent_channels=4,
                                    down_block_types=("HunyuanVideoDownBlock3D",) * 4,
                                    up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                    layers_per_block=1, act_fn="silu", norm_num_groups=4, scaling_factor=0.476986,
                                    spatial_compression_ratio=8, temporal_compression_ratio=4,
                                    mid_block_add_attention=True)
    transformer = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=4,
                                                 attention_head_dim=16, num_layers=2, num_single_layers=2,
                                                 num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                                 guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=32,
                                                 rope_axes_dim=(4, 6, 6))
    pipe = HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=_clip_text_model(32),
                                tokenizer_2=clip_tokenizer())
    return _finish(pipe, dtype)
