"""Stable Diffusion 1.x (epsilon), 2.x (v-prediction) and SDXL through the one adapter.

Each family is a tiny random pipeline built in code (``tiny_models``) and loaded from its folder.
For each: the adapter's conditioning and sampled trajectories match plain diffusers (pipeline and
DDIM scheduler step), one DPOK round through the Trainer moves only LoRA weights, the saved LoRA
loads in the plain diffusers pipeline with the same UNet outputs, and gradient checkpointing works
with LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import FAMILIES, build_family_pipeline, pipeline_class

from dpok.adapter import DiffusionAdapter, PromptEmbeds, pipeline_class_name
from dpok.config import build_config
from dpok.generate import generate_images
from dpok.sampling import sample_in_batches
from dpok.trainer import Trainer

PROMPTS = ["a red circle", "two blue squares"]
STEPS, GUIDANCE = 4, 4.0


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: build_family_pipeline(name, root / name) for name in FAMILIES}


@pytest.fixture(scope="module")
def folder(family_dirs: dict[str, Path], family: str) -> Path:
    return family_dirs[family]


def plain_pipeline(family: str, folder: Path):  # noqa: ANN201
    """The family's diffusers pipeline straight from the folder, with the DDIM scheduler."""
    from diffusers import DDIMScheduler

    pipe = pipeline_class(family).from_pretrained(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_inputs(adapter: DiffusionAdapter) -> tuple[torch.Tensor, torch.Tensor, PromptEmbeds]:
    """Fixed noisy latents (2, 4, 8, 8), timesteps (2,) and the prompts' conditioning."""
    x = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(5))
    return x, torch.tensor([801, 101]), adapter.encode_prompts(PROMPTS)


def test_the_adapter_loads_each_family_and_conditions_as_diffusers_does(folder: Path, family: str) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    adapter = DiffusionAdapter.from_pretrained(str(folder))
    assert type(adapter.pipe) is pipeline_class(family) and adapter.is_sdxl == (family == "sdxl")
    assert pipeline_class_name(str(folder)) == pipeline_class(family).__name__
    assert adapter.prediction_type == ("v_prediction" if family == "sd2" else "epsilon")
    for module in (adapter.unet, adapter.vae):  # PyTorch SDPA everywhere, no xformers
        assert all(isinstance(p, AttnProcessor2_0) for p in module.attn_processors.values())
    embeds = adapter.encode_prompts(PROMPTS)
    # the conditioning width is what the UNet cross-attends to, and what the text encoder reports
    assert embeds.cond.shape[-1] == adapter.unet.config.cross_attention_dim == adapter.text_encoder.config.hidden_size
    pipe = adapter.pipe
    if family != "sdxl":
        cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        torch.testing.assert_close(embeds.cond, cond)
        torch.testing.assert_close(embeds.uncond, uncond)
        assert embeds.pooled is None and embeds.time_ids is None
        return
    size = adapter.unet.config.sample_size * pipe.vae_scale_factor
    assert embeds.time_ids.tolist() == [[size, size, 0, 0, size, size]] * 2
    for zeros in (True, False):  # SDXL's empty-prompt branch: zeros, or the encoded empty prompt
        pipe.register_to_config(force_zeros_for_empty_prompt=zeros)
        embeds = adapter.encode_prompts(PROMPTS)
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(PROMPTS, device="cpu")
        for ours, theirs in ((embeds.cond, cond), (embeds.uncond, uncond), (embeds.pooled, pooled),
                             (embeds.uncond_pooled, uncond_pooled)):
            torch.testing.assert_close(ours, theirs)
        assert (embeds.uncond == 0).all() == zeros
    # the optional fields travel with indexing and concatenation
    both = PromptEmbeds.cat([embeds[1:], embeds[:1]])
    torch.testing.assert_close(both.pooled, embeds.pooled.flip(0))
    assert both.time_ids.shape == (2, 6) and both.uncond_pooled.shape == embeds.uncond_pooled.shape


@pytest.mark.filterwarnings("ignore::UserWarning")  # huggingface_hub's deprecation notice on diffusers' call
def test_a_hub_id_that_cannot_be_read_offline_is_taken_for_stable_diffusion() -> None:
    # the pipeline load that follows then reports the real problem (no network, not cached)
    assert pipeline_class_name("nobody/no-such-pipeline") == ""


def ddim_step(scheduler, model_output: torch.Tensor, t: torch.Tensor, x: torch.Tensor,  # noqa: ANN001
              variance_noise: torch.Tensor) -> torch.Tensor:
    """diffusers' DDIM step x_t (B, C, h, w) -> x_{t-1} at eta = 1 with the given N(0, I) draw."""
    return scheduler.step(model_output, t, x, eta=1.0, variance_noise=variance_noise).prev_sample


def test_trajectories_follow_the_diffusers_pipeline_and_ddim_step(folder: Path, family: str) -> None:
    from diffusers import DDIMScheduler

    adapter = DiffusionAdapter.from_pretrained(str(folder))
    traj = sample_in_batches(adapter, PROMPTS, 2, STEPS, 1.0, GUIDANCE, torch.Generator().manual_seed(3))
    # the plain pipeline with the same generator passes through the same latents at every step,
    # so the guided noise prediction (with SDXL's added conditioning) and the DDIM draws agree
    seen: list[torch.Tensor] = []

    def record(pipe, i: int, t: torch.Tensor, kwargs: dict) -> dict:  # noqa: ANN001
        seen.append(kwargs["latents"].clone())
        return kwargs

    plain_pipeline(family, folder)(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, eta=1.0,
                                   generator=torch.Generator().manual_seed(3), output_type="latent",
                                   callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents"])
    torch.testing.assert_close(traj.next_latents, torch.stack(seen, 1), atol=1e-4, rtol=1e-4)
    # replaying the scheduler's step with the generator's noise gives the recorded x_{t-1}, and the
    # recorded log-prob is the log-density of that step's Gaussian
    scheduler = DDIMScheduler.from_config(adapter.scheduler.config)
    scheduler.set_timesteps(STEPS)
    gen = torch.Generator().manual_seed(3)
    shape = traj.latents[:, 0].shape
    torch.testing.assert_close(traj.latents[:, 0], torch.randn(shape, generator=gen))
    for i, t in enumerate(scheduler.timesteps):
        x, noise = traj.latents[:, i], torch.randn(shape, generator=gen)
        with torch.no_grad():
            out = adapter.noise_pred(x, t.expand(2), traj.embeds, GUIDANCE)
        mean = ddim_step(scheduler, out, t, x, torch.zeros(shape))
        std = ddim_step(scheduler, out, t, x, torch.ones(shape)) - mean
        torch.testing.assert_close(ddim_step(scheduler, out, t, x, noise), traj.next_latents[:, i], atol=1e-5, rtol=1e-5)
        log_density = torch.distributions.Normal(mean, std).log_prob(traj.next_latents[:, i]).flatten(1).sum(1)
        torch.testing.assert_close(traj.log_probs[:, i], log_density, atol=2e-3, rtol=1e-5)


def test_generate_images_uses_the_pipeline_and_matches_the_sampler(folder: Path) -> None:
    adapter = DiffusionAdapter.from_pretrained(str(folder))
    images = generate_images(adapter, PROMPTS[0], 2, seed=7, num_steps=3, guidance_scale=GUIDANCE, eta=1.0)
    ours = sample_in_batches(adapter, [PROMPTS[0]] * 2, 2, 3, 1.0, GUIDANCE, torch.Generator().manual_seed(7)).images
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, ours, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def trained(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, dict[str, torch.Tensor]]:
    """One DPOK round through the Trainer (jpeg-compressibility reward); the trainable weights before it."""
    cfg = build_config(None, dict(model=str(folder), reward="jpeg-compressibility", prompt=PROMPTS, rounds=1,
                                  samples_per_round=2, sample_batch_size=2, minibatch_size=2, gradient_steps=1,
                                  num_steps=3, eval_images=1, learning_rate=1e-2, stat_min_count=1, stat_buffer=4,
                                  output_dir=str(tmp_path_factory.mktemp("run") / "out")))
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.adapter.unet.named_parameters() if p.requires_grad}
    trainer.run()
    return trainer, before


def test_one_dpok_round_through_the_trainer_moves_the_lora_weights(trained: tuple[Trainer, dict]) -> None:
    trainer, before = trained
    after = dict(trainer.adapter.unet.named_parameters())
    assert before and all("lora" in n for n in before)
    assert any(not torch.equal(v, after[n]) for n, v in before.items())
    rows = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and torch.isfinite(torch.tensor(rows[0]["train/loss"]))
    assert (trainer.out / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_saved_lora_loads_in_plain_diffusers_with_the_same_unet_outputs(trained: tuple[Trainer, dict], folder: Path,
                                                                        family: str) -> None:
    trainer, _ = trained
    adapter = trainer.adapter
    x, t, embeds = unet_inputs(adapter)

    def run(unet: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return unet(x, t, embeds.cond, added_cond_kwargs=embeds.added_cond_kwargs()).sample

    ours = run(adapter.unet)
    with adapter.reference():
        base = run(adapter.unet)
    plain = plain_pipeline(family, folder)
    plain.load_lora_weights(str(trainer.out / "lora"))
    torch.testing.assert_close(run(plain.unet), ours, atol=1e-5, rtol=1e-5)
    reloaded = DiffusionAdapter.from_pretrained(str(folder))
    reloaded.load_lora(trainer.out / "lora")
    torch.testing.assert_close(run(reloaded.unet), ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, ours, atol=1e-5), "the trained LoRA does not change the UNet"


def test_gradient_checkpointing_with_lora_gives_the_same_gradients(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    adapter = DiffusionAdapter.from_pretrained(str(folder))
    adapter.add_lora(rank=2, alpha=2.0)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A without gradient
        for name, p in adapter.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    x, t, embeds = unet_inputs(adapter)
    params = adapter.trainable_parameters()

    def grads() -> list[torch.Tensor]:
        for p in params:
            p.grad = None
        adapter.train(True)
        adapter.noise_pred(x, t, embeds, GUIDANCE).pow(2).mean().backward()
        adapter.train(False)
        return [p.grad.clone() for p in params]

    plain = grads()
    calls: list[int] = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    adapter.unet.enable_gradient_checkpointing()
    checkpointed = grads()
    assert calls, "gradient checkpointing was not used"
    assert all(g.abs().sum() > 0 for g in plain)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("algorithm", ["ddpo-is", "grpo", "diffusion-nft", "sft-kl", "rwr"])
def test_every_algorithm_runs_a_round_on_each_family(folder: Path, algorithm: str, tmp_path: Path) -> None:
    """DDPO, GRPO, DiffusionNFT and the supervised baselines too (the supervised ones keep SDXL's
    pooled embeddings and time ids with their data, and SFT-KL's reference prediction gets them as
    well); only the trainable weights move."""
    cfg = build_config(None, dict(model=str(folder), reward="jpeg-compressibility", prompt=PROMPTS, rounds=2,
                                  samples_per_round=2, sample_batch_size=2, minibatch_size=2, gradient_steps=1,
                                  num_steps=3, eval_images=1, learning_rate=1e-2, stat_min_count=1, stat_buffer=4,
                                  algorithm=algorithm, output_dir=str(tmp_path / "out")))
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.adapter.unet.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in trainer.adapter.unet.named_parameters() if not p.requires_grad}
    trainer.run()
    after = dict(trainer.adapter.unet.named_parameters())
    assert any(not torch.equal(v, after[n]) for n, v in before.items())
    assert all(torch.equal(v, after[n]) for n, v in frozen.items())
    state = trainer.algorithm.state_dict()
    if algorithm in ("sft-kl", "rwr", "diffusion-nft") and trainer.adapter.is_sdxl:
        assert state["time_ids"].shape == (len(state["x0"]), 6)
