"""Component tests on a tiny random Stable Diffusion pipeline built in code: sampling, ratios, KL,
each algorithm's update, LoRA save/reload in plain diffusers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from dpok.adapter import DiffusionAdapter, ModelLoadError
from dpok.algorithms import ALGORITHMS, AlgorithmContext, Rollout
from dpok.algorithms.dpok import step_kl
from dpok.config import TrainConfig, build_config
from dpok.sampling import evaluate_log_probs, policy_step, sample_in_batches, sample_trajectories

PROMPTS = ["a red circle", "two blue squares"]


def make_adapter(folder: Path, lora: bool = True) -> DiffusionAdapter:
    adapter = DiffusionAdapter.from_pretrained(str(folder))
    if lora:
        adapter.add_lora(rank=2, alpha=2.0)
    return adapter


def small_cfg(**kw: object) -> TrainConfig:
    base = dict(num_steps=4, samples_per_round=2, sample_batch_size=2, minibatch_size=2, gradient_steps=1,
                learning_rate=1e-2, eval_images=1, best_of=2, clip_range=0.2, stat_min_count=1, stat_buffer=4)
    base.update(kw)
    return TrainConfig.from_options(base).resolved()  # as build_run does: the algorithms' automatic settings


def test_sampler_matches_the_plain_diffusers_pipeline(tiny_pipeline_dir: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    adapter = make_adapter(tiny_pipeline_dir, lora=False)
    traj = sample_trajectories(adapter, PROMPTS, 5, 1.0, 4.0, torch.Generator().manual_seed(3))
    assert traj.latents.shape == (2, 5, 4, 8, 8) and traj.next_latents.shape == (2, 5, 4, 8, 8)
    assert traj.log_probs.shape == (2, 5) and torch.isfinite(traj.log_probs).all()
    assert traj.images.shape == (2, 3, 32, 32) and 0 <= traj.images.min() and traj.images.max() <= 1
    assert torch.equal(traj.latents[:, 1:], traj.next_latents[:, :-1])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ref = pipe(PROMPTS, num_inference_steps=5, guidance_scale=4.0, eta=1.0, generator=torch.Generator().manual_seed(3),
               output_type="latent").images
    torch.testing.assert_close(traj.final_latents, ref, atol=1e-4, rtol=1e-4)


def test_dpm_solver_rollouts_are_the_plain_pipeline_with_diffusers_dpm_solver(tiny_pipeline_dir: Path) -> None:
    """--rollout-solver dpm-solver++ on the DDIM timesteps, ending at the data: diffusers'
    DPMSolverMultistepScheduler (DPM-Solver++, order 2, lower order at the first and last step)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    adapter = make_adapter(tiny_pipeline_dir, lora=False)
    gen = torch.Generator().manual_seed(3)
    traj = sample_trajectories(adapter, PROMPTS, 6, 0.0, 4.0, gen, with_log_probs=False, solver="dpm-solver++")
    ddim = sample_trajectories(adapter, PROMPTS, 6, 0.0, 4.0, torch.Generator().manual_seed(3), with_log_probs=False)
    assert torch.equal(traj.latents[:, 0], ddim.latents[:, 0]) and torch.equal(traj.timesteps, ddim.timesteps)
    assert not torch.allclose(traj.final_latents, ddim.final_latents, atol=1e-3)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, timesteps=traj.timesteps.tolist(), guidance_scale=4.0, latents=traj.latents[:, 0].clone(),
               output_type="latent").images
    assert torch.equal(pipe.scheduler.timesteps, traj.timesteps)
    torch.testing.assert_close(traj.final_latents, ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="deterministic ODE solver"):
        sample_trajectories(adapter, PROMPTS, 6, 1.0, 4.0, gen, with_log_probs=False, solver="dpm-solver++")
    with pytest.raises(ValueError, match="solver must be one of"):
        sample_trajectories(adapter, PROMPTS, 6, 0.0, 4.0, gen, with_log_probs=False, solver="heun")


def test_a_trajectory_continued_from_a_mid_way_state_with_the_same_noise_is_the_same(tiny_pipeline_dir: Path) -> None:
    adapter = make_adapter(tiny_pipeline_dir, lora=False)
    traj = sample_trajectories(adapter, PROMPTS, 5, 1.0, 4.0, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    torch.randn(traj.latents[:, 0].shape, generator=gen)  # x_T, then the noise of the first 2 steps
    for _ in range(2):
        torch.randn(traj.latents[:, 0].shape, generator=gen)
    rest = sample_trajectories(adapter, PROMPTS, 5, 1.0, 4.0, gen, initial=traj.latents[:, 2], start_step=2)
    assert rest.num_steps == 3 and torch.equal(rest.timesteps, traj.timesteps[2:])
    torch.testing.assert_close(rest.final_latents, traj.final_latents, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rest.log_probs, traj.log_probs[:, 2:], atol=1e-4, rtol=1e-5)
    for bad in ({"start_step": 5, "initial": traj.latents[:, 0]}, {"start_step": 2}):
        with pytest.raises(ValueError, match="start_step"):
            sample_trajectories(adapter, PROMPTS, 5, 1.0, 4.0, gen, **bad)


def test_ratio_is_one_and_kl_zero_before_the_first_update(tiny_pipeline_dir: Path) -> None:
    adapter = make_adapter(tiny_pipeline_dir)
    traj = sample_trajectories(adapter, PROMPTS, 4, 1.0, 5.0, torch.Generator().manual_seed(0))
    n, t = traj.batch_size, traj.num_steps
    # re-evaluate all transitions at once, timesteps mixed in one batch, as the trainer does
    idx = torch.arange(n).repeat_interleave(t)
    embeds = traj.embeds[idx]
    timesteps = traj.timesteps.repeat(n)
    log_probs, dist, out = evaluate_log_probs(adapter, traj.latents.flatten(0, 1), traj.next_latents.flatten(0, 1),
                                              timesteps, embeds, 5.0, 1.0, 4)
    ratio = torch.exp(log_probs - traj.log_probs.flatten())
    torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)
    ref, ref_out = policy_step(adapter, traj.latents.flatten(0, 1), timesteps, embeds, 5.0, 1.0, 4, reference=True)
    assert step_kl("closed-form", dist, ref, out, ref_out, "sum").abs().max() == 0
    assert step_kl("epsilon", dist, ref, out, ref_out, "sum").abs().max() == 0


def _rollout(adapter: DiffusionAdapter, cfg: TrainConfig, seed: int = 0) -> Rollout:
    traj = sample_trajectories(adapter, PROMPTS, cfg.num_steps, cfg.eta, cfg.guidance_scale,
                               torch.Generator().manual_seed(seed), logprob_reduce=cfg.logprob_reduce)
    return Rollout(traj, torch.tensor([1.0, 0.0]), torch.tensor([True, True]))


def _context(adapter: DiffusionAdapter, cfg: TrainConfig, reward: object = None) -> AlgorithmContext:
    opt = torch.optim.AdamW(adapter.trainable_parameters(), lr=cfg.learning_rate)
    return AlgorithmContext(cfg, adapter, opt, np.random.default_rng(0), torch.Generator().manual_seed(0), reward)


def test_one_dpok_round_changes_only_lora_weights(tiny_pipeline_dir: Path) -> None:
    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(advantage="value")
    algo = ALGORITHMS.create("dpok", _context(adapter, cfg))
    before = {k: v.clone() for k, v in adapter.unet.state_dict().items()}
    value_before = [p.clone() for p in algo.value.parameters()]
    stats = algo.update(_rollout(adapter, cfg)).metrics()
    assert all(np.isfinite(v) for v in stats.values())
    after = adapter.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "no weight changed"
    assert all("lora" in k for k in changed), sorted(changed)[:5]
    assert any(not torch.equal(a, b) for a, b in zip(value_before, algo.value.parameters()))
    # only the trained window's steps enter the buffer (the defaults leave out the final quarter)
    from dpok.core import step_window

    pg = cfg.policy_gradient
    assert stats["buffer_size"] == 2 * len(step_window(cfg.num_steps, pg.step_window_start, pg.step_window_end)) == 6


@pytest.mark.parametrize("name", ["dpok", "ddpo-sf", "ddpo-is", "grpo", "diffusion-nft", "sft-kl", "rwr", "rwr-sparse"])
def test_every_algorithm_updates_the_policy(tiny_pipeline_dir: Path, name: str) -> None:
    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(algorithm=name)
    algo = ALGORITHMS.create(name, _context(adapter, cfg))
    before = [p.clone() for p in adapter.trainable_parameters()]
    stats = algo.update(_rollout(adapter, cfg)).metrics()
    assert stats and all(np.isfinite(v) for v in stats.values()), stats
    assert any(not torch.equal(a, b) for a, b in zip(before, adapter.trainable_parameters()))
    state = algo.state_dict()
    fresh = ALGORITHMS.create(name, _context(adapter, cfg))
    fresh.load_state_dict(state)


def test_invalid_samples_are_left_out_of_the_update(tiny_pipeline_dir: Path) -> None:
    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg()
    algo = ALGORITHMS.create("dpok", _context(adapter, cfg))
    rollout = _rollout(adapter, cfg)
    before = [p.clone() for p in adapter.trainable_parameters()]
    result = algo.update(Rollout(rollout.trajectory, rollout.rewards, torch.tensor([False, False])))
    bad = sample_trajectories(adapter, PROMPTS, cfg.num_steps, cfg.eta, cfg.guidance_scale, torch.Generator(),
                              logprob_reduce="sum")
    with pytest.raises(ValueError, match="logprob_reduce"):
        algo.update(Rollout(bad, rollout.rewards, rollout.valid))
    assert result.skipped and result.metrics() == {"skipped_updates": 1.0}
    assert all(torch.equal(a, b) for a, b in zip(before, adapter.trainable_parameters()))
    assert len(algo.buffer) == 0


def test_rejection_sampling_returns_the_best_candidate(tiny_pipeline_dir: Path) -> None:
    from dpok.rewards import RewardOutput

    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(algorithm="rejection-sampling", best_of=3)
    brightness = lambda images, prompts: RewardOutput.from_raw(images.mean((1, 2, 3)))  # noqa: E731
    algo = ALGORITHMS.create("rejection-sampling", _context(adapter, cfg, brightness))
    best = algo.generate(["a red circle"] * 2, torch.Generator().manual_seed(1))
    candidates = sample_in_batches(adapter, ["a red circle"] * 6, cfg.sample_batch_size, cfg.num_steps, 1.0,
                                   cfg.guidance_scale, torch.Generator().manual_seed(1)).images
    expected = candidates.view(2, 3, *candidates.shape[1:]).mean((2, 3, 4)).max(1).values
    torch.testing.assert_close(best.mean((1, 2, 3)), expected)
    assert algo.reward_queries_per_image() == 3


def test_saved_lora_reloads_in_diffusers_and_reproduces_samples(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(advantage="value")  # two prompts, one sample each: groups of one carry no signal
    algo = ALGORITHMS.create("dpok", _context(adapter, cfg))
    for seed in range(2):
        algo.update(_rollout(adapter, cfg, seed))
    weights = adapter.save_lora(tmp_path / "lora")
    assert weights.name == "pytorch_lora_weights.safetensors" and weights.is_file()
    ours = sample_trajectories(adapter, PROMPTS, 4, 1.0, cfg.guidance_scale, torch.Generator().manual_seed(9))
    base = sample_trajectories(adapter, PROMPTS, 4, 1.0, cfg.guidance_scale, torch.Generator().manual_seed(9),
                               reference=True)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    theirs = pipe(PROMPTS, num_inference_steps=4, guidance_scale=cfg.guidance_scale, eta=1.0,
                  generator=torch.Generator().manual_seed(9), output_type="latent").images
    torch.testing.assert_close(theirs, ours.final_latents, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(base.final_latents, ours.final_latents, atol=1e-4)


def test_full_finetuning_uses_a_frozen_reference(tiny_pipeline_dir: Path) -> None:
    adapter = make_adapter(tiny_pipeline_dir, lora=False)
    adapter.enable_full_finetuning()
    cfg = small_cfg(finetune="full")
    algo = ALGORITHMS.create("dpok", _context(adapter, cfg))
    algo.update(_rollout(adapter, cfg))
    ref = dict(adapter.reference_unet.named_parameters())
    assert any(not torch.equal(p, ref[k]) for k, p in adapter.unet.named_parameters())


def test_eta_zero_and_bad_values_are_rejected_before_loading(tiny_pipeline_dir: Path) -> None:
    with pytest.raises(ValueError, match="eta"):
        build_config(None, {"eta": 0.0})
    with pytest.raises(ValueError, match="multiple of --sample-batch-size"):
        build_config(None, {"samples_per_round": 10, "sample_batch_size": 4})
    with pytest.raises(ValueError, match="--algorithm 'ppo'"):
        build_config(None, {"algorithm": "ppo"})
    with pytest.raises(ValueError, match="--preset"):
        build_config("nope", {})
    adapter = make_adapter(tiny_pipeline_dir, lora=False)
    with pytest.raises(ValueError, match="eta"):
        sample_trajectories(adapter, PROMPTS, 2, 0.0, 1.0, torch.Generator())


def test_missing_or_broken_model_folders_name_the_problem(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        DiffusionAdapter.from_pretrained(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json"):
        DiffusionAdapter.from_pretrained(str(tmp_path / "empty"))
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelLoadError, match="'unet/'"):
        DiffusionAdapter.from_pretrained(str(broken))


def test_presets_carry_the_published_settings() -> None:
    cfg = build_config("dpok-paper", {})
    pg = cfg.policy_gradient
    assert (cfg.dpok.alpha, pg.beta, cfg.learning_rate, cfg.samples_per_round, pg.clip_range) == (10.0, 0.01, 1e-5, 10, 1e-4)
    assert (cfg.gradient_steps, cfg.grad_accum, cfg.minibatch_size, cfg.dpok.buffer_size) == (5, 12, 4, 1000)
    assert build_config("dpok-paper-multi", {}).dpok.alpha == 1000.0
    assert build_config("ddpo-paper", {}).samples_per_round == 256
    assert build_config("dpok-paper", {"beta": 0.5}).policy_gradient.beta == 0.5  # user options win over the preset
    assert dataclasses.asdict(build_config(None, {}))["algorithm"] == "dpok"


def test_batch_sizes_default_to_the_largest_fitting_divisor() -> None:
    from dpok.config import largest_divisor_at_most

    assert [largest_divisor_at_most(n, 32) for n in (1, 2, 8, 24, 32, 48, 100, 37)] == [1, 2, 8, 24, 32, 24, 25, 1]
    # lowering the budget needs no other option (it used to fail on the default batch size of 32)
    for algorithm in ("dpok", "ddpo-sf", "ddpo-is"):
        for samples in (2, 4, 8, 48):
            cfg = build_config(None, {"algorithm": algorithm, "samples_per_round": samples})
            r = cfg.resolved()
            assert samples % r.sample_batch_size == 0 and r.sample_batch_size <= 32
            # DDPO's minibatches are whole samples that divide the round: at most 32 (SF), 8 (IS, GRPO)
            expected = {"dpok": 32, "ddpo-sf": min(samples, 32) if samples != 48 else 24, "ddpo-is": min(samples, 8)}
            assert r.minibatch_size == expected[algorithm]
    two = TrainConfig.from_options(algorithm="ddpo-is", samples_per_round=12).resolved(num_processes=2)
    assert (two.sample_batch_size, two.minibatch_size) == (6, 6)  # each process's share is 6
    two = TrainConfig.from_options(algorithm="ddpo-is", samples_per_round=20).resolved(num_processes=2)
    assert (two.sample_batch_size, two.minibatch_size) == (10, 5)
    explicit = TrainConfig.from_options(samples_per_round=8, sample_batch_size=4, minibatch_size=3).resolved()
    assert (explicit.sample_batch_size, explicit.minibatch_size) == (4, 3)
    with pytest.raises(ValueError, match="sample-batch-size must be >= 0"):
        build_config(None, {"sample_batch_size": -1})
