"""Tests of the pure-torch math core: Gaussians, DDIM/DDPM steps, advantages and losses.

Scheduler references come from diffusers (only the tests import it); every other expected
number is worked out by hand in the test.
"""

from __future__ import annotations

import ast
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch.distributions import Normal, kl_divergence

import dpok.core
from dpok.core import (
    PerPromptStatTracker,
    clip_advantages,
    ddim_log_prob,
    ddim_sample_next,
    ddim_step_distribution,
    ddpo_is_loss,
    ddpo_sf_loss,
    dpok_loss,
    gaussian_kl_same_std,
    gaussian_log_prob,
    previous_timestep,
    rwr_loss,
    rwr_sparse_weights,
    rwr_weights,
    sft_kl_loss,
    value_loss,
)

NUM_TRAIN = 1000
NUM_INFERENCE = 20
LATENT_SHAPE = (4, 8, 8)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ddim_scheduler(prediction_type: str) -> DDIMScheduler:
    scheduler = DDIMScheduler(
        num_train_timesteps=NUM_TRAIN,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    scheduler.set_timesteps(NUM_INFERENCE)
    return scheduler


def _ddpm_scheduler() -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=NUM_TRAIN,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        variance_type="fixed_small",
    )


# --------------------------------------------------------------------------- package hygiene


def test_core_never_imports_diffusers() -> None:
    core_dir = Path(dpok.core.__file__).parent
    imported = set()
    for path in core_dir.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
    assert "torch" in imported
    assert "diffusers" not in imported


# --------------------------------------------------------------------------- gaussian


def test_gaussian_log_prob_matches_torch_normal_for_every_std_shape() -> None:
    gen = _generator(0)
    x = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    mean = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64)
    std = torch.tensor([0.3, 1.0, 2.5], dtype=torch.float64)
    expected = Normal(mean, std.view(3, 1, 1, 1)).log_prob(x).sum(dim=(1, 2, 3))

    for std_arg in (std, std.view(3, 1, 1, 1)):
        got = gaussian_log_prob(x, mean, std_arg)
        assert got.shape == (3,)
        torch.testing.assert_close(got, expected)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std, reduce="mean"), expected / 32)

    expected_scalar = Normal(mean, 0.7).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mean, 0.7), expected_scalar)


def test_gaussian_log_prob_hand_value() -> None:
    # One 2-d sample at distance (1, 1) from the mean with std 1: -1 - log(2 pi).
    got = gaussian_log_prob(torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2), 1.0)
    assert got.item() == pytest.approx(-1.0 - math.log(2 * math.pi), abs=1e-6)


def test_gaussian_rejects_bad_arguments() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="reduce"):
        gaussian_log_prob(x, x, 1.0, reduce="max")
    with pytest.raises(ValueError, match="same shape"):
        gaussian_log_prob(x, torch.zeros(2, 4), 1.0)
    with pytest.raises(ValueError, match="std"):
        gaussian_log_prob(x, x, torch.ones(2, 3, 5))


def test_kl_same_std_matches_torch_kl_divergence() -> None:
    gen = _generator(1)
    mean_p = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    mean_q = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    std = torch.tensor([0.5, 1.0, 1.5, 3.0], dtype=torch.float64)
    std_b = std.view(4, 1, 1)
    expected = kl_divergence(Normal(mean_p, std_b), Normal(mean_q, std_b)).sum(dim=(1, 2))
    torch.testing.assert_close(gaussian_kl_same_std(mean_p, mean_q, std), expected)
    torch.testing.assert_close(gaussian_kl_same_std(mean_p, mean_q, std, reduce="mean"), expected / 15)
    assert torch.all(gaussian_kl_same_std(mean_p, mean_p, std) == 0)


def test_kl_same_std_hand_value_and_monte_carlo() -> None:
    # ||(0.3, -0.5, 0.8)||^2 / (2 * 0.7^2) = 0.98 / 0.98 = 1.
    mean_p = torch.tensor([[0.3, -0.5, 1.0]], dtype=torch.float64)
    mean_q = torch.tensor([[0.0, 0.0, 0.2]], dtype=torch.float64)
    std = 0.7
    assert gaussian_kl_same_std(mean_p, mean_q, std).item() == pytest.approx(1.0, abs=1e-12)

    num_samples = 100_000
    x = mean_p + std * torch.randn(num_samples, 3, generator=_generator(2), dtype=torch.float64)
    log_ratio = gaussian_log_prob(x, mean_p.expand_as(x), std) - gaussian_log_prob(x, mean_q.expand_as(x), std)
    # log p - log q has variance ||mean_p - mean_q||^2 / std^2 = 2, so the standard error is ~0.0045.
    assert log_ratio.mean().item() == pytest.approx(1.0, abs=0.02)


# --------------------------------------------------------------------------- DDIM / DDPM


def _random_step_inputs(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = _generator(seed)
    model_output = torch.randn(batch, *LATENT_SHAPE, generator=gen)
    sample = torch.randn(batch, *LATENT_SHAPE, generator=gen)
    noise = torch.randn(batch, *LATENT_SHAPE, generator=gen)
    return model_output, sample, noise


def test_previous_timestep_follows_the_diffusers_stride() -> None:
    got = previous_timestep(torch.tensor([951, 1]), NUM_TRAIN, NUM_INFERENCE)
    assert got.tolist() == [901, -49]
    assert got.dtype == torch.long
    with pytest.raises(ValueError, match="num_inference_steps"):
        previous_timestep(torch.tensor([5]), NUM_TRAIN, 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("step_index", [0, 5, NUM_INFERENCE - 1])
def test_ddim_step_matches_diffusers(prediction_type: str, step_index: int) -> None:
    scheduler = _ddim_scheduler(prediction_type)
    t = int(scheduler.timesteps[step_index])
    model_output, sample, noise = _random_step_inputs(2, seed=step_index)
    reference = scheduler.step(model_output, t, sample, eta=1.0, variance_noise=noise)

    timesteps = torch.full((2,), t)
    dist = ddim_step_distribution(
        model_output,
        sample,
        timesteps,
        previous_timestep(timesteps, NUM_TRAIN, NUM_INFERENCE),
        scheduler.alphas_cumprod,
        eta=1.0,
        final_alpha_cumprod=scheduler.final_alpha_cumprod,
        prediction_type=prediction_type,
    )
    assert dist.std.shape == (2, 1, 1, 1)
    torch.testing.assert_close(ddim_sample_next(dist, noise), reference.prev_sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dist.pred_original_sample, reference.pred_original_sample, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_is_batched_over_per_sample_timesteps(prediction_type: str) -> None:
    scheduler = _ddim_scheduler(prediction_type)
    timesteps = scheduler.timesteps[[0, 7, 13, NUM_INFERENCE - 1]]
    model_output, sample, noise = _random_step_inputs(4, seed=10)
    dist = ddim_step_distribution(
        model_output,
        sample,
        timesteps,
        previous_timestep(timesteps, NUM_TRAIN, NUM_INFERENCE),
        scheduler.alphas_cumprod,
        eta=1.0,
        final_alpha_cumprod=scheduler.final_alpha_cumprod,
        prediction_type=prediction_type,
    )
    got = ddim_sample_next(dist, noise)
    for i, t in enumerate(timesteps.tolist()):
        one = slice(i, i + 1)
        reference = scheduler.step(model_output[one], t, sample[one], eta=1.0, variance_noise=noise[one])
        torch.testing.assert_close(got[one], reference.prev_sample, atol=1e-5, rtol=1e-5)
    # Different timesteps must give different stds, otherwise the batching silently broadcast one value.
    assert dist.std.flatten().unique().numel() == 4


def test_ddim_eta_zero_is_deterministic_and_has_no_log_prob() -> None:
    scheduler = _ddim_scheduler("epsilon")
    t = int(scheduler.timesteps[3])
    model_output, sample, _ = _random_step_inputs(2, seed=3)
    dist = ddim_step_distribution(
        model_output, sample, t, t - NUM_TRAIN // NUM_INFERENCE, scheduler.alphas_cumprod, 0.0,
        scheduler.final_alpha_cumprod,
    )  # fmt: skip
    assert torch.all(dist.std == 0)
    reference = scheduler.step(model_output, t, sample, eta=0.0).prev_sample
    torch.testing.assert_close(dist.mean, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="eta = 0"):
        ddim_log_prob(dist.mean, dist)


def test_ddim_log_prob_of_own_sample() -> None:
    scheduler = _ddim_scheduler("epsilon")
    t = int(scheduler.timesteps[10])
    model_output, sample, noise = _random_step_inputs(3, seed=4)
    dist = ddim_step_distribution(
        model_output, sample, t, t - NUM_TRAIN // NUM_INFERENCE, scheduler.alphas_cumprod, 1.0,
        scheduler.final_alpha_cumprod,
    )  # fmt: skip
    next_latents = ddim_sample_next(dist, noise)
    dims = math.prod(LATENT_SHAPE)
    std = dist.std.flatten()
    # log N(mean + std z; mean, std^2) = -||z||^2 / 2 - D log std - D/2 log(2 pi)
    expected = -0.5 * noise.pow(2).sum(dim=(1, 2, 3)) - dims * std.log() - 0.5 * dims * math.log(2 * math.pi)
    torch.testing.assert_close(ddim_log_prob(next_latents, dist), expected, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(ddim_log_prob(next_latents, dist, reduce="mean"), expected / dims, atol=1e-5, rtol=1e-5)


def test_ddim_computes_in_float32_from_half_inputs() -> None:
    scheduler = _ddim_scheduler("epsilon")
    model_output, sample, _ = _random_step_inputs(2, seed=5)
    timesteps, prev_timesteps = torch.tensor([501, 51]), torch.tensor([451, 1])
    args = (timesteps, prev_timesteps, scheduler.alphas_cumprod, 1.0, scheduler.final_alpha_cumprod)
    dist_half = ddim_step_distribution(model_output.half(), sample.half(), *args)
    dist_full = ddim_step_distribution(model_output.half().float(), sample.half().float(), *args)
    assert dist_half.mean.dtype == torch.float32
    assert dist_half.std.dtype == torch.float32
    torch.testing.assert_close(dist_half.mean, dist_full.mean)


def test_ddim_rejects_bad_arguments() -> None:
    scheduler = _ddim_scheduler("epsilon")
    model_output, sample, _ = _random_step_inputs(2, seed=6)
    schedule = (scheduler.alphas_cumprod, 1.0, scheduler.final_alpha_cumprod)
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step_distribution(model_output, sample, 501, 451, *schedule, prediction_type="x0")
    with pytest.raises(ValueError, match="timesteps"):
        ddim_step_distribution(model_output, sample, 1000, 950, *schedule)
    with pytest.raises(ValueError, match="timesteps"):
        ddim_step_distribution(model_output, sample, torch.tensor([501, 451, 1]), 451, *schedule)
    with pytest.raises(ValueError, match="eta"):
        ddim_step_distribution(model_output, sample, 501, 451, scheduler.alphas_cumprod, 1.5, 0.99)


def test_ddim_eta_one_is_the_diffusers_ddpm_step_for_consecutive_timesteps() -> None:
    # DDIM with eta = 1 is the DDPM posterior with the "fixed_small" variance
    scheduler = _ddpm_scheduler()
    timesteps = torch.tensor([999, 500, 10, 1, 0])
    model_output, sample, _ = _random_step_inputs(5, seed=7)
    dist = ddim_step_distribution(model_output, sample, timesteps, timesteps - 1, scheduler.alphas_cumprod, 1.0, 1.0)
    for i, t in enumerate(timesteps.tolist()):
        reference = scheduler.step(model_output[i : i + 1], t, sample[i : i + 1], generator=_generator(100 + i))
        noise = torch.randn(1, *LATENT_SHAPE, generator=_generator(100 + i))
        got = dist.mean[i : i + 1] + dist.std[i : i + 1] * noise
        torch.testing.assert_close(got, reference.prev_sample, atol=1e-5, rtol=1e-5)
        if t > 0:
            expected_var = scheduler._get_variance(t)
            torch.testing.assert_close(dist.std[i].flatten() ** 2, expected_var.reshape(1), rtol=1e-5, atol=1e-12)
    # The last step of the chain is deterministic (abar_prev = 1), as in diffusers.
    assert dist.std[-1].item() == 0.0


def test_ddim_eta_one_is_the_diffusers_ddpm_step_for_strided_timesteps() -> None:
    scheduler = _ddpm_scheduler()
    scheduler.set_timesteps(NUM_INFERENCE)
    timesteps = scheduler.timesteps[[0, 9]]
    prev_timesteps = scheduler.timesteps[[1, 10]]
    assert (timesteps - prev_timesteps).tolist() == [50, 50]
    model_output, sample, _ = _random_step_inputs(2, seed=8)
    dist = ddim_step_distribution(model_output, sample, timesteps, prev_timesteps, scheduler.alphas_cumprod, 1.0, 1.0)
    for i, t in enumerate(timesteps.tolist()):
        reference = scheduler.step(model_output[i : i + 1], t, sample[i : i + 1], generator=_generator(i))
        noise = torch.randn(1, *LATENT_SHAPE, generator=_generator(i))
        got = dist.mean[i : i + 1] + dist.std[i : i + 1] * noise
        torch.testing.assert_close(got, reference.prev_sample, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- advantages


def test_clip_advantages() -> None:
    got = clip_advantages(torch.tensor([-7.0, -0.5, 0.0, 2.0, 9.0]), 5.0)
    assert got.tolist() == [-5.0, -0.5, 0.0, 2.0, 5.0]
    with pytest.raises(ValueError, match="limit"):
        clip_advantages(torch.zeros(2), 0.0)


def test_tracker_uses_batch_stats_until_min_count_then_per_prompt_stats() -> None:
    tracker = PerPromptStatTracker(buffer_size=4, min_count=3)

    # "a" has 2 rewards and "b" 1 (< 3): the whole batch (1, 3, 10) normalises everything.
    adv = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 10.0]))
    mean, std = 14.0 / 3.0, statistics.pstdev([1.0, 3.0, 10.0])
    torch.testing.assert_close(adv, torch.tensor([1.0 - mean, 3.0 - mean, 10.0 - mean]) / std)

    # "a" now holds (1, 3, 5): its own stats; "b" holds (10, 20): still the batch (5, 20).
    adv = tracker.update(["a", "b"], torch.tensor([5.0, 20.0]))
    expected_a = (5.0 - 3.0) / statistics.pstdev([1.0, 3.0, 5.0])
    expected_b = (20.0 - 12.5) / 7.5
    torch.testing.assert_close(adv, torch.tensor([expected_a, expected_b]))

    # The buffer keeps the last 4 rewards of "a": (3, 5, 7, 9), mean 6 and pstdev sqrt(5).
    adv = tracker.update(["a", "a"], torch.tensor([7.0, 9.0]))
    torch.testing.assert_close(adv, torch.tensor([1.0, 3.0]) / math.sqrt(5.0))
    assert tracker.stats() == {
        "num_prompts": 2,
        "num_rewards": 6,
        "min_prompt_count": 2,
        "max_prompt_count": 4,
        "num_prompts_ready": 1,
    }


def test_tracker_ignores_non_finite_rewards() -> None:
    tracker = PerPromptStatTracker(buffer_size=8, min_count=8)
    rewards = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    adv = tracker.update(["a", "a", "a", "b"], rewards)
    # Batch statistics over the finite (1, 3): mean 2, std 1.
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-5, rtol=1e-5)
    assert tracker.state_dict()["buffers"] == {"a": [1.0, 3.0]}


def test_tracker_state_dict_round_trip_gives_identical_outputs() -> None:
    gen = _generator(9)
    original = PerPromptStatTracker(buffer_size=5, min_count=3)
    prompts = ["cat", "dog", "cat", "fox"] * 2
    for _ in range(3):
        original.update(prompts, torch.randn(8, generator=gen))

    restored = PerPromptStatTracker(buffer_size=100, min_count=1)
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.buffer_size == 5 and restored.min_count == 3
    assert restored.stats() == original.stats()

    next_rewards = torch.randn(8, generator=gen)
    expected = original.update(prompts, next_rewards)
    got = restored.update(prompts, next_rewards)
    assert torch.equal(got, expected)
    assert restored.state_dict() == original.state_dict()
    assert len(restored.state_dict()["buffers"]["cat"]) == 5


def test_tracker_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="min_count"):
        PerPromptStatTracker(buffer_size=4, min_count=5)
    with pytest.raises(ValueError, match="prompts"):
        PerPromptStatTracker().update(["a"], torch.zeros(2))


# --------------------------------------------------------------------------- losses


def test_ddpo_is_loss_at_ratio_one() -> None:
    log_probs = torch.tensor([-3.0, -1.0, -2.0], requires_grad=True)
    advantages = torch.tensor([1.0, -2.0, 3.0])
    loss, stats = ddpo_is_loss(log_probs, log_probs.detach().clone(), advantages, clip_range=0.2)
    assert loss.item() == pytest.approx(-2.0 / 3.0)
    assert stats["clip_fraction"] == 0.0
    assert stats["approx_kl"] == 0.0
    assert stats["ratio_mean"] == stats["ratio_min"] == stats["ratio_max"] == pytest.approx(1.0)
    loss.backward()
    # At ratio 1, d ratio / d log_prob = 1: gradient -A / N.
    torch.testing.assert_close(log_probs.grad, -advantages / 3)


def test_ddpo_is_loss_ppo_clipping_cases() -> None:
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    old_log_probs = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    log_probs = (old_log_probs + ratios.log()).requires_grad_(True)
    loss, stats = ddpo_is_loss(log_probs, old_log_probs, advantages, clip_range=0.2)
    # Per transition max(-A r, -A clip(r)):
    #   A=+1, r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped, no grad)
    #   A=+1, r=0.5 -> max(-0.5, -0.8) = -0.5 (unclipped)
    #   A=-1, r=1.5 -> max( 1.5,  1.2) =  1.5 (unclipped)
    #   A=-1, r=0.5 -> max( 0.5,  0.8) =  0.8 (clipped, no grad)
    #   A=+2, r=1.1 -> -2.2 (inside the range)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5, abs=1e-6)
    assert stats["policy_loss"] == pytest.approx(loss.item())
    assert stats["clip_fraction"] == pytest.approx(0.8)
    assert stats["ratio_mean"] == pytest.approx(1.02, abs=1e-6)
    assert stats["ratio_min"] == pytest.approx(0.5, abs=1e-6)
    assert stats["ratio_max"] == pytest.approx(1.5, abs=1e-6)
    expected_kl = 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2 + math.log(1.1) ** 2) / 5
    assert stats["approx_kl"] == pytest.approx(expected_kl, abs=1e-6)
    loss.backward()
    # d(-A r)/d log_prob = -A r, divided by N = 5.
    torch.testing.assert_close(log_probs.grad, torch.tensor([0.0, -0.5, 1.5, 0.0, -2.2]) / 5)


def test_ddpo_sf_loss_value_and_gradient() -> None:
    log_probs = torch.tensor([-0.5, -1.0, -2.0], requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 2.0])
    loss, stats = ddpo_sf_loss(log_probs, advantages)
    # A * log p = (-0.5, 1.0, -4.0), sum -3.5.
    assert loss.item() == pytest.approx(3.5 / 3)
    assert stats["policy_loss"] == pytest.approx(3.5 / 3)
    loss.backward()
    torch.testing.assert_close(log_probs.grad, -advantages / 3)


def _dpok_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ratios = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    old_log_probs = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    log_probs = (old_log_probs + ratios.log()).requires_grad_(True)
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    kl = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], requires_grad=True)
    return log_probs, old_log_probs, advantages, kl


def test_dpok_loss_clamps_the_ratio_and_adds_the_kl() -> None:
    log_probs, old_log_probs, advantages, kl = _dpok_inputs()
    # -alpha A clamp(r): clamp(r) = (1.2, 0.8, 1.2, 0.8, 1.1) -> -A clamp(r) = (-1.2, -0.8, 1.2, 0.8, -2.2),
    # mean -0.44; unlike PPO the A=+1, r=0.5 case is clamped too.
    loss0, stats0 = dpok_loss(log_probs, old_log_probs, advantages, kl, alpha=2.0, beta=0.0, clip_range=0.2)
    assert loss0.item() == pytest.approx(-0.88, abs=1e-6)
    assert stats0["kl_loss"] == 0.0
    assert stats0["kl"] == pytest.approx(0.3)

    loss, stats = dpok_loss(log_probs, old_log_probs, advantages, kl, alpha=2.0, beta=0.5, clip_range=0.2)
    assert loss.item() == pytest.approx(-0.88 + 0.5 * 0.3, abs=1e-6)
    assert stats["policy_loss"] == pytest.approx(-0.88, abs=1e-6)
    assert stats["kl_loss"] == pytest.approx(0.15)
    assert stats["clip_fraction"] == pytest.approx(0.8)
    loss.backward()
    # Only the in-range transition carries policy gradient: -alpha A r / N = -2 * 2 * 1.1 / 5.
    torch.testing.assert_close(log_probs.grad, torch.tensor([0.0, 0.0, 0.0, 0.0, -0.88]))
    torch.testing.assert_close(kl.grad, torch.full((5,), 0.5 / 5))


def test_value_loss() -> None:
    values = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    loss, stats = value_loss(values, torch.tensor([0.0, 2.0, 5.0]))
    assert loss.item() == pytest.approx(5.0 / 3.0)
    assert stats == pytest.approx({"value_loss": 5.0 / 3.0, "value_mean": 2.0})


def test_sft_kl_loss_hand_values() -> None:
    eps_pred = torch.zeros(2, 1, 1, 2, requires_grad=True)
    eps_target = torch.tensor([[1.0, 1.0], [2.0, 0.0]]).view(2, 1, 1, 2)  # per-sample mse (1, 2)
    eps_ref = torch.tensor([[0.0, 2.0], [1.0, 1.0]]).view(2, 1, 1, 2)  # per-sample mse (2, 1)
    weights = torch.tensor([2.0, 0.5])
    loss, stats = sft_kl_loss(eps_pred, eps_target, eps_ref, weights, gamma=0.1)
    # denoise = mean(2 * 1, 0.5 * 2) = 1.5; kl = mean(2, 1) = 1.5; loss = 1.5 + 0.1 * 1.5.
    assert stats["denoise_loss"] == pytest.approx(1.5)
    assert stats["kl"] == pytest.approx(1.5)
    assert stats["kl_loss"] == pytest.approx(0.15)
    assert loss.item() == pytest.approx(1.65)


def test_rwr_weights_behaviour() -> None:
    torch.testing.assert_close(rwr_weights(torch.full((4,), 3.0), temperature=0.5), torch.ones(4))
    got = rwr_weights(torch.tensor([0.0, 1.0]), temperature=1.0)
    torch.testing.assert_close(got, 2 * torch.tensor([1.0, math.e]) / (1 + math.e))
    sharp = rwr_weights(torch.tensor([0.0, 1.0, 2.0]), temperature=0.01)
    torch.testing.assert_close(sharp, torch.tensor([0.0, 0.0, 3.0]))
    with_nan = rwr_weights(torch.tensor([1.0, float("nan"), 1.0]), temperature=1.0)
    torch.testing.assert_close(with_nan, torch.tensor([1.5, 0.0, 1.5]))
    with pytest.raises(ValueError, match="temperature"):
        rwr_weights(torch.zeros(2), temperature=0.0)


def test_rwr_sparse_weights_keep_the_top_percentile() -> None:
    rewards = torch.tensor([3.0, 1.0, 5.0, 2.0, 4.0])
    # 60th percentile of (1..5) with linear interpolation: 1 + 0.6 * 4 = 3.4.
    assert rwr_sparse_weights(rewards, 60.0).tolist() == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert rwr_sparse_weights(rewards, 0.0).tolist() == [1.0] * 5
    assert rwr_sparse_weights(rewards, 100.0).tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert rwr_sparse_weights(torch.tensor([1.0, float("nan"), 2.0]), 50.0).tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="percentile"):
        rwr_sparse_weights(rewards, 101.0)


def test_rwr_loss_hand_value() -> None:
    eps_pred = torch.zeros(2, 1, 1, 2)
    eps_target = torch.tensor([[1.0, 1.0], [2.0, 0.0]]).view(2, 1, 1, 2)  # per-sample mse (1, 2)
    loss, stats = rwr_loss(eps_pred, eps_target, torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(1.0)
    assert stats == pytest.approx({"rwr_loss": 1.0, "weight_mean": 0.5})


_N = torch.zeros(3)
_EPS = torch.zeros(3, 1, 2, 2)


@pytest.mark.parametrize(
    ("call", "bad_name"),
    [
        (lambda: ddpo_is_loss(_N, torch.zeros(4), _N, 0.2), "old_log_probs"),
        (lambda: ddpo_is_loss(_N, _N, torch.zeros(3, 1), 0.2), "advantages"),
        (lambda: ddpo_sf_loss(_N, torch.zeros(2)), "advantages"),
        (lambda: dpok_loss(_N, _N, _N, torch.zeros(2), 1.0, 0.1, 0.2), "kl"),
        (lambda: value_loss(_N, torch.zeros(5)), "rewards"),
        (lambda: sft_kl_loss(_EPS, torch.zeros(3, 1, 2, 3), _EPS, _N, 0.1), "eps_target"),
        (lambda: sft_kl_loss(_EPS, _EPS, _EPS, torch.zeros(4), 0.1), "weights"),
        (lambda: rwr_loss(_EPS, _EPS, torch.zeros(2)), "weights"),
        (lambda: ddpo_is_loss(_N, _N, _N, 0.0), "clip_range"),
    ],
)
def test_losses_reject_mismatched_shapes_naming_the_argument(call, bad_name: str) -> None:
    with pytest.raises(ValueError, match=bad_name):
        call()


def test_lr_factor_schedules_on_hand_worked_rounds() -> None:
    from dpok.core import lr_factor

    assert [lr_factor(i, 4) for i in range(4)] == [1.0, 1.0, 1.0, 1.0]
    assert [lr_factor(i, 4, "linear") for i in range(4)] == [1.0, 0.75, 0.5, 0.25]
    cos = [lr_factor(i, 4, "cosine") for i in range(4)]
    assert cos == pytest.approx([1.0, (1 + 2**-0.5) / 2, 0.5, (1 - 2**-0.5) / 2])
    # two warm-up rounds (1/3, 2/3), then linear over the remaining two
    assert [lr_factor(i, 4, "linear", 2) for i in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.5])
    assert lr_factor(3, 4, "cosine") > 0  # the last round still steps
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, 4, "step")
    with pytest.raises(ValueError, match="warmup_rounds"):
        lr_factor(0, 4, "cosine", 4)
