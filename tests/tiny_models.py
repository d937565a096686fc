"""Tiny random pipelines of each Stable Diffusion family, built in code and saved to a folder.

All have 32 px images and 8x8x4 latents, so a whole trajectory costs milliseconds on the CPU:

- ``sd1``: SD 1.x layout, epsilon prediction, CLIP text encoder's last states;
- ``sd2``: SD 2.x layout (linear transformer projections, per-block head sizes, gelu text encoder,
  upcast attention), v-prediction;
- ``sdxl``: SDXL layout, two text encoders (the second with a projection), ``text_time`` added
  conditioning whose input width is 6 time ids x ``addition_time_embed_dim`` + the pooled width.

and of each flow-matching family (:data:`FLOW_FAMILIES`), same image and latent sizes:

- ``sd3``: SD3/SD3.5 layout, CLIP-L and CLIP-G (projected, pooled) plus T5, an ``SD3Transformer2DModel``,
  the flow-match Euler scheduler with SD3's timestep shift 3;
- ``flux``: FLUX.1-dev layout, CLIP (pooled) plus T5, a ``FluxTransformer2DModel`` with the guidance
  embedding over 2x2-packed latents, the scheduler's dynamic shift from the image sequence length.

The T5 tokenizer is a sentencepiece-style unigram model over the ShapeWorld words, built in code.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("sd1", "sd2", "sdxl")
FLOW_FAMILIES = ("sd3", "flux")
TEXT_WIDTH = 16  # each text encoder's hidden size
POOLED_WIDTH = 16  # SDXL's projected pooled embedding
TIME_EMBED = 8  # SDXL's addition_time_embed_dim
T5_WIDTH = 32  # T5's d_model: the flow transformers' joint_attention_dim (>= both CLIP widths, SD3 pads to it)


def _tokenizer(folder: Path, name: str):  # noqa: ANN202
    from dpok.embedded.tokenizer import build_tokenizer

    return build_tokenizer(folder.parent / f"{folder.name}-{name}")


def _vae(**kw: object):  # noqa: ANN202
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32, **kw,
    )


def _text_config(tok, layers: int = 1, **kw: object):  # noqa: ANN001, ANN202
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tok), hidden_size=TEXT_WIDTH, intermediate_size=32, num_hidden_layers=layers,
                          num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                          **kw)


def _scheduler(prediction_type: str):  # noqa: ANN202
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def _unet(cross_attention_dim: int, **kw: object):  # noqa: ANN202
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=8, **kw,
    )


def build_family_pipeline(family: str, folder: Path, seed: int = 0) -> Path:
    """Save a random pipeline of ``family`` (one of :data:`FAMILIES`) to ``folder``; returns it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    if family == "sdxl":
        tok, tok_2 = _tokenizer(folder, "tokenizer"), _tokenizer(folder, "tokenizer-2")
        unet = _unet(2 * TEXT_WIDTH, attention_head_dim=(2, 4), use_linear_projection=True,
                     addition_embed_type="text_time", addition_time_embed_dim=TIME_EMBED,
                     projection_class_embeddings_input_dim=6 * TIME_EMBED + POOLED_WIDTH)
        # two layers each, so the penultimate states SDXL uses differ from the last ones
        text = CLIPTextModel(_text_config(tok, layers=2, hidden_act="quick_gelu"))
        text_2 = CLIPTextModelWithProjection(_text_config(tok_2, layers=2, hidden_act="gelu", projection_dim=POOLED_WIDTH))
        pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=text, text_encoder_2=text_2, tokenizer=tok,
                                         tokenizer_2=tok_2, unet=unet, scheduler=_scheduler("epsilon"),
                                         force_zeros_for_empty_prompt=True, add_watermarker=False)
    elif family in ("sd1", "sd2"):
        tok = _tokenizer(folder, "tokenizer")
        if family == "sd1":
            unet = _unet(TEXT_WIDTH, attention_head_dim=2)
            text = CLIPTextModel(_text_config(tok))
        else:
            unet = _unet(TEXT_WIDTH, attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
            text = CLIPTextModel(_text_config(tok, hidden_act="gelu"))
        pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=text, tokenizer=tok, unet=unet,
                                       scheduler=_scheduler("v_prediction" if family == "sd2" else "epsilon"),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    pipe.save_pretrained(folder)
    return folder


def pipeline_class(family: str):  # noqa: ANN201
    """The plain diffusers pipeline class of ``family``."""
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline,
            "flux": FluxPipeline}.get(family, StableDiffusionPipeline)


def _t5_tokenizer(folder: Path):  # noqa: ANN202
    from dpok.embedded.tokenizer import build_t5_tokenizer

    return build_t5_tokenizer(folder.parent / f"{folder.name}-tokenizer-t5")


def _t5(tok):  # noqa: ANN001, ANN202
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=T5_WIDTH, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))


def build_flow_pipeline(family: str, folder: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Save a random flow-matching pipeline of ``family`` (one of :data:`FLOW_FAMILIES`) to ``folder``.

    ``guidance_embeds=False`` gives FLUX.1-schnell's layout (no guidance embedding)."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    vae = _vae(scaling_factor=0.8, shift_factor=0.1)  # as SD3's and FLUX's VAEs, decoding must apply both
    if family == "sd3":
        tok, tok_2, tok_3 = _tokenizer(folder, "tokenizer"), _tokenizer(folder, "tokenizer-2"), _t5_tokenizer(folder)
        # two layers each: SD3 conditions on the penultimate CLIP states
        text = CLIPTextModelWithProjection(_text_config(tok, layers=2, hidden_act="quick_gelu",
                                                        projection_dim=POOLED_WIDTH))
        text_2 = CLIPTextModelWithProjection(_text_config(tok_2, layers=2, hidden_act="gelu",
                                                          projection_dim=POOLED_WIDTH))
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
            pooled_projection_dim=2 * POOLED_WIDTH, pos_embed_max_size=8,
        )
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                        vae=vae, text_encoder=text, tokenizer=tok, text_encoder_2=text_2,
                                        tokenizer_2=tok_2, text_encoder_3=_t5(tok_3), tokenizer_3=tok_3)
    elif family == "flux":
        tok, tok_2 = _tokenizer(folder, "tokenizer"), _t5_tokenizer(folder)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=TEXT_WIDTH,
            guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
        )
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                    max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=CLIPTextModel(_text_config(tok)), tokenizer=tok,
                            text_encoder_2=_t5(tok_2), tokenizer_2=tok_2, transformer=transformer)
    else:
        raise ValueError(f"unknown flow family {family!r}; one of {FLOW_FAMILIES}")
    pipe.save_pretrained(folder)
    return folder
