"""Architectures of the embedded ShapeWorld text-to-image model (all stock diffusers/transformers).

Sizes were chosen from timings on a 2-core CPU (see benchmarks/ and the pretraining log):

- VAE: AutoencoderKL 64 px -> 16x16x4, widths (32, 64, 64), no mid-block attention (0.9M).
  Convolution only, so it can be trained on 32 px crops at a quarter of the cost.
- Text encoder: CLIPTextModel, 3 layers of width 64 (0.2M), 16 tokens.
- UNet: UNet2DConditionModel on 16x16x4, widths (40, 80, 80), cross-attention only at 8x8 and 4x4
  (attention over the 256 tokens of the 16x16 level dominated the cost and did not help), and the
  text embedding attention-pooled into the time embedding (``addition_embed_type="text"``), which
  makes global attributes such as colour and count easy to condition on. The stock
  ``StableDiffusionPipeline`` feeds it without change.
- Scheduler: Stable Diffusion's scaled-linear DDPM schedule (1000 steps), epsilon prediction.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

from .tokenizer import MODEL_MAX_LENGTH

LATENT_CHANNELS = 4
LATENT_SIZE = 16
TEXT_WIDTH = 64


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=64,
        mid_block_add_attention=False,
        scaling_factor=1.0,  # set from the trained encoder's latent std before saving
    )


def make_text_encoder(vocab_size: int, bos_token_id: int, eos_token_id: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        projection_dim=TEXT_WIDTH,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    return CLIPTextModel(config)


def make_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(40, 80, 80),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers reads this as the number of heads
        norm_num_groups=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def make_scheduler() -> DDIMScheduler:
    """Stable Diffusion v1's schedule; DDIM is what the pipeline and the RL sampler use."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


# ------------------------------------------------------------------------ the flow-matching model
# The second embedded model is a StableDiffusion3Pipeline folder: the same tokenizer, text encoder
# (as both CLIP slots, no T5) and VAE as the first, and a small SD3 transformer trained with the
# rectified-flow loss. Without T5 the SD3 pipeline appends ``max_sequence_length`` (256) zero
# tokens to the 16 CLIP tokens (both slots side by side); ``dpok.attention.FoldedJointAttnProcessor`` folds them into one,
# exactly, in training and sampling.

FLOW_WIDTH = 128  # 4 heads of 32
FLOW_BLOCKS = 4
FLOW_PATCH = 2  # 16 x 16 latents -> 64 image tokens
FLOW_JOINT_DIM = 2 * TEXT_WIDTH  # the two CLIP slots' states side by side; T5's width when absent
SD3_T5_TOKENS = 256  # StableDiffusion3Pipeline's default max_sequence_length


def make_sd3_transformer() -> SD3Transformer2DModel:
    """SD3's MMDiT at toy size (2.3 M parameters): joint attention over 64 image tokens and the text
    tokens, pooled text (both CLIP projections, 2 x 64) added to the time embedding."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=FLOW_PATCH,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=FLOW_BLOCKS,
        attention_head_dim=FLOW_WIDTH // 4,
        num_attention_heads=4,
        joint_attention_dim=FLOW_JOINT_DIM,
        caption_projection_dim=FLOW_WIDTH,
        pooled_projection_dim=FLOW_JOINT_DIM,
        pos_embed_max_size=LATENT_SIZE // FLOW_PATCH,
    )


def make_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Rectified flow, x_t = (1 - t) x_0 + t eps, Euler steps; no timestep shift (SD3 shifts by 3
    for 1024 px images; at 16 x 16 latents the unshifted schedule is the natural one)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def text_encoder_with_projection(encoder: CLIPTextModel) -> CLIPTextModelWithProjection:
    """The trained CLIP text encoder as SD3 needs it (``CLIPTextModelWithProjection``), with an
    identity projection so that SD3's pooled embedding is exactly the trained pooled state."""
    from transformers import CLIPTextModelWithProjection

    config = copy.deepcopy(encoder.config)
    config.projection_dim = config.hidden_size
    projected = CLIPTextModelWithProjection(config)
    # transformers 5 makes CLIPTextModel the bare text transformer, older versions wrap it in .text_model
    projected.text_model.load_state_dict(getattr(encoder, "text_model", encoder).state_dict())
    with torch.no_grad():
        projected.text_projection.weight.copy_(torch.eye(config.hidden_size))
    return projected
