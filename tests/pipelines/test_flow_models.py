"""SD3 and FLUX (flow matching, velocity prediction) through the one adapter, on tiny random pipelines.

For each: the conditioning is the pipeline's, a noise-level-0 trajectory is the plain diffusers
pipeline's (same initial noise, every step), an SDE trajectory replays with Flow-GRPO's step and
its Gaussian log-density, the ratio is 1 before any update, and one round of GRPO, DDPO-IS/SF and DPOK
through the Trainer writes a LoRA that plain diffusers loads and samples with the same latents.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import FLOW_FAMILIES, build_flow_pipeline, pipeline_class

from dpok.adapter import DiffusionAdapter, ModelLoadError
from dpok.config import build_config
from dpok.core import flow_sde_step_distribution, step_kl
from dpok.sampling import evaluate_log_probs, policy_step, sample_in_batches
from dpok.trainer import Trainer

PROMPTS = ["a red circle", "two blue squares"]
STEPS, GUIDANCE, NOISE_LEVEL = 4, 4.0, 0.7


@pytest.fixture(scope="module", params=FLOW_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def flow_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow")
    return {name: build_flow_pipeline(name, root / name) for name in FLOW_FAMILIES}


@pytest.fixture(scope="module")
def folder(flow_dirs: dict[str, Path], family: str) -> Path:
    return flow_dirs[family]


@pytest.fixture(scope="module")
def adapter(folder: Path) -> DiffusionAdapter:
    return DiffusionAdapter.from_pretrained(str(folder))


def plain_pipeline(family: str, folder: Path):  # noqa: ANN201
    pipe = pipeline_class(family).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_plain(pipe, family: str, seed: int, output_type: str = "latent",  # noqa: ANN001
              record: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The plain pipeline's output (latents (B, C, h, w), unpacked for FLUX, or images), at 32 px with
    the tiny T5 length; ``record`` receives x_t after every step."""
    def callback(p, i: int, t: torch.Tensor, kwargs: dict) -> dict:  # noqa: ANN001
        if record is not None:
            record.append(unpack(pipe, family, kwargs["latents"].clone()))
        return kwargs

    out = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32,
               max_sequence_length=16, generator=torch.Generator().manual_seed(seed), output_type=output_type,
               callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"]).images
    return unpack(pipe, family, out) if output_type == "latent" else out


def unpack(pipe, family: str, latents: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    return pipe._unpack_latents(latents, 32, 32, pipe.vae_scale_factor) if family == "flux" else latents


def test_the_adapter_loads_each_flow_family_and_conditions_as_diffusers_does(adapter: DiffusionAdapter,
                                                                            family: str) -> None:
    assert type(adapter.pipe) is pipeline_class(family) and adapter.is_flow and not adapter.is_sdxl
    assert adapter.family == "flow-matching" and adapter.prediction_type == "flow"
    assert adapter.latent_shape == (4, 8, 8)
    embeds = adapter.encode_prompts(PROMPTS)
    assert embeds.cond.shape[-1] == adapter.text_encoder.config.hidden_size
    if family == "sd3":
        cond, uncond, pooled, uncond_pooled = adapter.pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                                         max_sequence_length=16)
    else:
        cond, pooled, _ = adapter.pipe.encode_prompt(PROMPTS, None, max_sequence_length=16)
        uncond, uncond_pooled, _ = adapter.pipe.encode_prompt(["", ""], None, max_sequence_length=16)
    for ours, theirs in ((embeds.cond, cond), (embeds.uncond, uncond), (embeds.pooled, pooled),
                         (embeds.uncond_pooled, uncond_pooled)):
        torch.testing.assert_close(ours, theirs)


def test_noise_level_zero_is_the_plain_pipeline(adapter: DiffusionAdapter, folder: Path, family: str) -> None:
    traj = sample_in_batches(adapter, PROMPTS, 2, STEPS, 0.0, GUIDANCE, torch.Generator().manual_seed(3),
                             with_log_probs=False)
    seen: list[torch.Tensor] = []
    pipe = plain_pipeline(family, folder)
    run_plain(pipe, family, 3, record=seen)
    # same initial noise, same timesteps (SD3's shift; FLUX's dynamic shift), same Euler steps
    torch.testing.assert_close(traj.next_latents, torch.stack(seen, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(traj.images, run_plain(pipe, family, 3, output_type="pt"), atol=1e-5, rtol=0)


def test_an_sde_trajectory_replays_with_flow_grpos_step_and_its_gaussian(adapter: DiffusionAdapter, folder: Path,
                                                                        family: str) -> None:
    traj = sample_in_batches(adapter, PROMPTS, 2, STEPS, NOISE_LEVEL, GUIDANCE, torch.Generator().manual_seed(4),
                             logprob_reduce="sum")
    assert traj.timesteps.dtype == torch.float32 and traj.timesteps[0] == 1000
    gen = torch.Generator().manual_seed(4)
    shape = traj.latents[:, 0].shape
    torch.testing.assert_close(traj.latents[:, 0], torch.randn(shape, generator=gen))
    pipe = plain_pipeline(family, folder)
    run_plain(pipe, family, 0)
    sigmas = pipe.scheduler.sigmas  # the pipeline's schedule of STEPS steps (SD3's shift, FLUX's dynamic shift)
    for i, t in enumerate(traj.timesteps):
        with torch.no_grad():
            v = adapter.noise_pred(traj.latents[:, i], t.expand(2), traj.embeds, GUIDANCE)
        dist = flow_sde_step_distribution(v, traj.latents[:, i], sigmas[i], sigmas[i + 1], NOISE_LEVEL, sigmas[1])
        torch.testing.assert_close(dist.mean + dist.std * torch.randn(shape, generator=gen), traj.next_latents[:, i])
        normal = torch.distributions.Normal(dist.mean, dist.std.expand(shape))
        torch.testing.assert_close(traj.log_probs[:, i], normal.log_prob(traj.next_latents[:, i]).flatten(1).sum(1),
                                   atol=1e-3, rtol=1e-5)


def test_ratio_is_one_and_kl_zero_before_the_first_update(adapter: DiffusionAdapter) -> None:
    adapter.add_lora(rank=2, alpha=2.0)
    try:
        traj = sample_in_batches(adapter, PROMPTS, 2, STEPS, NOISE_LEVEL, GUIDANCE, torch.Generator().manual_seed(0),
                                 logprob_reduce="mean")
        n, t = traj.batch_size, traj.num_steps
        embeds = traj.embeds[torch.arange(n).repeat_interleave(t)]
        timesteps = traj.timesteps.repeat(n)  # every step of every sample in one batch, as the trainer does
        args = (traj.latents.flatten(0, 1), timesteps, embeds, GUIDANCE, NOISE_LEVEL, STEPS)
        log_probs, dist, out = evaluate_log_probs(adapter, traj.latents.flatten(0, 1), traj.next_latents.flatten(0, 1),
                                                  *args[1:], logprob_reduce="mean")
        ratio = torch.exp(log_probs - traj.log_probs.flatten())
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=0)
        ref, ref_out = policy_step(adapter, *args, reference=True)
        assert step_kl("closed-form", dist, ref, out, ref_out, "sum").abs().max() == 0
    finally:
        adapter.unet.delete_adapters(list(adapter.unet.peft_config))
        adapter.lora_config = None


@pytest.fixture(scope="module", params=["grpo", "ddpo-is", "ddpo-sf", "dpok", "sft-kl", "rwr", "diffusion-nft"])
def trained(request: pytest.FixtureRequest, folder: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Trainer, dict[str, torch.Tensor]]:
    """One round of ``algorithm`` through the Trainer (jpeg-compressibility reward); the LoRA weights before it."""
    cfg = build_config(None, dict(model=str(folder), reward="jpeg-compressibility", prompt=PROMPTS, rounds=1,
                                  samples_per_round=2, sample_batch_size=2, minibatch_size=2, gradient_steps=1,
                                  num_steps=3, eta=NOISE_LEVEL, eval_images=1, learning_rate=1e-2, stat_min_count=1,
                                  stat_buffer=4, algorithm=request.param, guidance_scale=GUIDANCE,
                                  output_dir=str(tmp_path_factory.mktemp("run") / "out")))
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.adapter.unet.named_parameters() if p.requires_grad}
    trainer.run()
    return trainer, before


def test_one_round_moves_only_the_lora_weights_and_they_load_in_plain_diffusers(
        trained: tuple[Trainer, dict], folder: Path, family: str) -> None:
    trainer, before = trained
    adapter = trainer.adapter
    after = dict(adapter.unet.named_parameters())
    assert before and all("lora" in n for n in before)
    assert any(not torch.equal(v, after[n]) for n, v in before.items())
    rows = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and torch.isfinite(torch.tensor(rows[0]["train/loss"]))
    # the fine-tuned policy's ODE samples, by the adapter and by plain diffusers with the saved LoRA
    ours = sample_in_batches(adapter, PROMPTS, 2, STEPS, 0.0, GUIDANCE, torch.Generator().manual_seed(5),
                             with_log_probs=False).final_latents
    pipe = plain_pipeline(family, folder)
    base = run_plain(pipe, family, 5)
    pipe.load_lora_weights(str(trainer.out / "lora"))
    torch.testing.assert_close(run_plain(pipe, family, 5), ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base, ours, atol=1e-5), "the trained LoRA does not change the transformer"
    reloaded = DiffusionAdapter.load(str(folder), lora=str(trainer.out / "lora"), device="cpu")
    again = sample_in_batches(reloaded, PROMPTS, 2, STEPS, 0.0, GUIDANCE, torch.Generator().manual_seed(5),
                              with_log_probs=False).final_latents
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=0)


def test_rejection_sampling_runs_on_a_flow_model(flow_dirs: dict[str, Path], tmp_path: Path) -> None:
    cfg = build_config(None, dict(model=str(flow_dirs["flux"]), reward="jpeg-compressibility", prompt=PROMPTS,
                                  rounds=1, samples_per_round=2, sample_batch_size=2, num_steps=3, eta=NOISE_LEVEL,
                                  eval_images=1, best_of=2, algorithm="rejection-sampling",
                                  output_dir=str(tmp_path / "out")))
    trainer = Trainer(cfg)
    trainer.run()
    summary = json.loads((trainer.out / "summary.json").read_text())
    assert summary["reward_queries_per_eval_image"] == 2 and "lora" not in summary["files"]


def test_gradient_checkpointing_of_the_transformer_gives_the_same_gradients(adapter: DiffusionAdapter) -> None:
    adapter.add_lora(rank=2, alpha=2.0)
    try:
        with torch.no_grad():  # LoRA's B starts at zero, which would leave A without gradient
            for name, p in adapter.unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
        x = torch.randn((2, *adapter.latent_shape), generator=torch.Generator().manual_seed(1))
        t, embeds = torch.tensor([1000.0, 400.0]), adapter.encode_prompts(PROMPTS)
        params = adapter.trainable_parameters()

        def grads() -> list[torch.Tensor]:
            for p in params:
                p.grad = None
            adapter.train(True)
            adapter.noise_pred(x, t, embeds, GUIDANCE).pow(2).mean().backward()
            adapter.train(False)
            return [p.grad.clone() for p in params]

        plain = grads()
        adapter.unet.enable_gradient_checkpointing()
        assert adapter.unet.is_gradient_checkpointing
        checkpointed = grads()
        assert all(g.abs().sum() > 0 for g in plain)
        for a, b in zip(plain, checkpointed, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    finally:
        adapter.unet.disable_gradient_checkpointing()
        adapter.unet.delete_adapters(list(adapter.unet.peft_config))
        adapter.lora_config = None


def test_flux_schnell_has_no_guidance_and_dev_takes_it_through_its_embedding(flow_dirs: dict[str, Path],
                                                                              tmp_path: Path) -> None:
    schnell = DiffusionAdapter.from_pretrained(str(build_flow_pipeline("flux", tmp_path / "schnell",
                                                                       guidance_embeds=False)))
    dev = DiffusionAdapter.from_pretrained(str(flow_dirs["flux"]))
    x = torch.randn((2, *schnell.latent_shape), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1000.0, 500.0])
    with torch.no_grad():
        embeds = schnell.encode_prompts(PROMPTS)
        torch.testing.assert_close(schnell.noise_pred(x, t, embeds, 1.0), schnell.noise_pred(x, t, embeds, 7.0))
        embeds = dev.encode_prompts(PROMPTS)
        assert not torch.allclose(dev.noise_pred(x, t, embeds, 1.0), dev.noise_pred(x, t, embeds, 7.0))


def test_sample_images_of_a_flow_model_are_its_pipelines_at_noise_level_zero(flow_dirs: dict[str, Path]) -> None:
    from dpok.generate import generate_images

    adapter = DiffusionAdapter.from_pretrained(str(flow_dirs["sd3"]))
    images = generate_images(adapter, PROMPTS[0], 2, seed=7, num_steps=3, guidance_scale=GUIDANCE, eta=0.0)
    pipe = plain_pipeline("sd3", flow_dirs["sd3"])
    plain = pipe([PROMPTS[0]] * 2, num_inference_steps=3, guidance_scale=GUIDANCE, max_sequence_length=16,
                 generator=torch.Generator().manual_seed(7), output_type="pt").images
    torch.testing.assert_close(images, plain, atol=1e-5, rtol=0)
    noisy = generate_images(adapter, PROMPTS[0], 2, seed=7, num_steps=3, guidance_scale=GUIDANCE, eta=NOISE_LEVEL)
    assert noisy.shape == plain.shape and not torch.allclose(noisy, plain, atol=1e-3)


def test_sd3_without_t5_encodes_as_its_pipeline_with_the_zero_tail_folded(flow_dirs: dict[str, Path]) -> None:
    from dpok.generate import generate_images

    family = "sd3"
    pipe = plain_pipeline(family, flow_dirs[family])
    pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    adapter = DiffusionAdapter.from_pipeline(pipe)
    assert adapter.folded_text
    embeds = adapter.encode_prompts(PROMPTS)
    cond, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu", do_classifier_free_guidance=False,
                                            max_sequence_length=1)
    torch.testing.assert_close(embeds.cond, cond)
    torch.testing.assert_close(embeds.pooled, pooled)
    # the folded model samples what the stock pipeline without T5 samples with its 256 zero tokens
    images = generate_images(adapter, PROMPTS[0], 2, seed=7, num_steps=3, guidance_scale=GUIDANCE, eta=0.0)
    stock = plain_pipeline(family, flow_dirs[family])
    stock.text_encoder_3, stock.tokenizer_3 = None, None
    plain = stock([PROMPTS[0]] * 2, num_inference_steps=3, guidance_scale=GUIDANCE,
                  generator=torch.Generator().manual_seed(7), output_type="pt").images
    torch.testing.assert_close(images, plain, atol=1e-5, rtol=0)
    with pytest.raises(ModelLoadError, match="no transformer"):
        DiffusionAdapter.from_pipeline(type(pipe)(**{**pipe.components, "transformer": None}))


def test_nft_trains_a_flow_model_on_its_samplers_shifted_timesteps(adapter: DiffusionAdapter,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """x_t = (1 - t) x_0 + t eps at t = timestep / 1000 of the rollout's (shifted) schedule."""
    from dpok.algorithms import ALGORITHMS
    from tests.pipelines.test_nft_grpo import _spy_noised
    from tests.pipelines.test_training import _context, _rollout, small_cfg

    seen = _spy_noised(monkeypatch)
    cfg = small_cfg(algorithm="diffusion-nft", nft_train_steps=2, num_steps=3, eta=NOISE_LEVEL, guidance_scale=GUIDANCE)
    adapter.add_lora(rank=2, alpha=2.0)
    try:
        rollout = _rollout(adapter, cfg)
        ALGORITHMS.create("diffusion-nft", _context(adapter, cfg)).update(rollout)
    finally:
        adapter.unet.delete_adapters(list(adapter.unet.peft_config))
        adapter.lora_config = None
    grid = rollout.trajectory.timesteps
    assert len(seen) == 2 and grid.dtype.is_floating_point
    for x0, noise, t, latents in seen:
        assert all(torch.isclose(grid, v).any() for v in t)
        s = (t / 1000.0).view(-1, *[1] * (x0.ndim - 1))
        torch.testing.assert_close(latents, ((1 - s) * x0 + s * noise).to(latents.dtype))


def test_dpm_solver_rollouts_of_a_flow_model(adapter: DiffusionAdapter) -> None:
    """Two steps of DPM-Solver++(2M) are both of first order, which on a rectified flow is the Euler
    ODE; with more steps the multistep correction moves the samples, from the same x_T."""
    from dpok.sampling import sample_trajectories

    def run(steps: int, solver: str) -> torch.Tensor:
        return sample_trajectories(adapter, PROMPTS, steps, 0.0, GUIDANCE, torch.Generator().manual_seed(2),
                                   with_log_probs=False, solver=solver).final_latents

    torch.testing.assert_close(run(2, "dpm-solver++"), run(2, "ddim"), atol=1e-5, rtol=1e-5)
    dpm, euler = run(4, "dpm-solver++"), run(4, "ddim")
    assert torch.isfinite(dpm).all() and not torch.allclose(dpm, euler, atol=1e-4)


def test_the_sd3_presets_adapt_the_joint_attention_only_as_the_papers_scripts() -> None:
    """SD3.5's dual-attention blocks have a second, image-only attention ``attn2``: the presets'
    ``attn.``-prefixed targets leave it out, as Flow-GRPO's and DiffusionNFT's target modules do."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig

    from dpok.config import PRESETS, SD3_JOINT_ATTENTION, SD3_PAPER_TARGETS

    def adapted(targets: str) -> set[str]:
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                      caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8,
                                      dual_attention_layers=(0,))
        model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets.split(",")))
        return {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}

    paper, bare = adapted(SD3_PAPER_TARGETS), adapted(SD3_JOINT_ATTENTION)
    assert paper and all(".attn." in n for n in paper) and not any("attn2" in n for n in paper)
    assert len(paper) == 8 + 7  # 8 modules per block; the last block's context stream has no to_add_out
    assert bare - paper == {f"transformer_blocks.0.attn2.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0")}
    for name in ("flow-grpo-paper", "diffusion-nft-paper"):
        assert PRESETS[name]()["flow_overrides"]["lora_targets"] == SD3_PAPER_TARGETS
