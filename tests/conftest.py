"""Shared fixtures: tiny random Stable Diffusion pipelines built in code, and the shipped assets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

ASSETS = Path(__file__).resolve().parent.parent / "dpok" / "assets"


TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "pipelines", "e2e")
"""Each test lives in the folder of its tier (see tests/README.md), which gives it the tier's marker."""


@pytest.hookimpl(tryfirst=True)  # the tier markers are set before -m selects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its folder's tier; refuse tests outside the tier folders; leave out the
    ``slow`` tests unless the ``-m`` expression names ``slow``."""
    outside = []
    for item in items:
        path = Path(item.path).resolve()
        tier = path.relative_to(TESTS).parts[0] if path.is_relative_to(TESTS) and path.parent != TESTS else None
        if tier not in TIERS:
            outside.append(item.nodeid)
            continue
        item.add_marker(getattr(pytest.mark, tier))
    if outside:
        raise pytest.UsageError(f"tests must be in tests/unit, tests/pipelines or tests/e2e (one folder per tier, see "
                                f"tests/README.md); these are not: {', '.join(sorted(set(outside)))}")
    if "slow" in (config.option.markexpr or ""):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


def build_tiny_pipeline(folder: Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A random SD-1.x-shaped pipeline (32 px images, 8x8x4 latents) saved to ``folder``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dpok.embedded.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(folder.parent / f"{folder.name}-tokenizer")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=tok.model_max_length,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.eos_token_id))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_reward_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dpok.embedded.alignment import AlignmentNet, AlignmentRewardModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("rewards") / "tiny-alignment"
    AlignmentRewardModel(AlignmentNet(width=16)).save(folder)
    return folder


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    folder = ASSETS / "shapeworld"
    if not (folder / "model_index.json").is_file():
        pytest.fail(f"the shipped ShapeWorld model is missing from {folder}")
    return folder


@pytest.fixture(scope="session")
def shipped_reward_dir() -> Path:
    folder = ASSETS / "shapeworld-alignment"
    if not (folder / "model.safetensors").is_file():
        pytest.fail(f"the shipped alignment reward is missing from {folder}")
    return folder


@pytest.fixture(scope="session")
def shipped_flow_model_dir() -> Path:
    folder = ASSETS / "shapeworld-flow"
    if not (folder / "model_index.json").is_file():
        pytest.fail(f"the shipped flow-matching ShapeWorld model is missing from {folder}")
    return folder
