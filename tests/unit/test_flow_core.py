"""Flow-GRPO's reverse-time SDE step (dpok.core.flow) against hand-worked numbers, torch.distributions,
diffusers' FlowMatchEulerDiscreteScheduler and the analytic marginals of Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal, kl_divergence

from dpok.core import ddim_log_prob, ddim_sample_next, flow_sde_sigma, flow_sde_step_distribution, step_kl


def test_one_step_by_hand() -> None:
    # t = 0.5 -> 0.25, a = 1: sigma_t^2 = t / (1 - t) = 1; x = 1, v = 2
    # drift = v + sigma^2 / (2t) (x + (1 - t) v) = 2 + 1 * (1 + 1) = 4; mean = 1 - 0.25 * 4 = 0
    # std = sigma_t sqrt(0.25) = 0.5; x0_hat = x - t v = 0
    dist = flow_sde_step_distribution(torch.full((1, 2), 2.0), torch.ones(1, 2), 0.5, 0.25, 1.0)
    torch.testing.assert_close(dist.mean, torch.zeros(1, 2))
    torch.testing.assert_close(dist.std, torch.full((1, 1), 0.5))
    torch.testing.assert_close(dist.pred_original_sample, torch.zeros(1, 2))


def test_the_first_step_takes_sigma_at_the_schedules_second_time() -> None:
    # at t = 1, 1 - t is taken at t_cap: sigma = a sqrt(1 / (1 - t_cap))
    sigma = flow_sde_sigma(torch.tensor([1.0, 0.5]), 0.7, t_cap=0.9)
    torch.testing.assert_close(sigma, torch.tensor([0.7 * math.sqrt(10.0), 0.7]))
    with pytest.raises(ValueError, match="t_cap"):
        flow_sde_sigma(torch.tensor([1.0]), 0.7)
    with pytest.raises(ValueError, match="t_next < t"):
        flow_sde_step_distribution(torch.zeros(1, 2), torch.zeros(1, 2), 0.5, 0.5, 0.7)


def test_log_prob_and_closed_form_kl_match_torch_distributions() -> None:
    gen = torch.Generator().manual_seed(0)
    x, v, v_ref = (torch.randn(3, 4, 2, 2, generator=gen) for _ in range(3))
    t, t_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.8, 0.3, 0.0])  # first, middle and last steps
    dist = flow_sde_step_distribution(v, x, t, t_next, 0.7, t_cap=0.8)
    ref = flow_sde_step_distribution(v_ref, x, t, t_next, 0.7, t_cap=0.8)
    assert dist.std.shape == (3, 1, 1, 1) and bool((dist.std > 0).all())
    x_next = ddim_sample_next(dist, torch.randn(x.shape, generator=gen))
    normal, normal_ref = Normal(dist.mean, dist.std.expand_as(x)), Normal(ref.mean, ref.std.expand_as(x))
    torch.testing.assert_close(ddim_log_prob(x_next, dist), normal.log_prob(x_next).flatten(1).sum(1))
    torch.testing.assert_close(ddim_log_prob(x_next, dist, reduce="mean"), normal.log_prob(x_next).flatten(1).mean(1))
    torch.testing.assert_close(step_kl("closed-form", dist, ref, v, v_ref, "sum"),
                               kl_divergence(normal, normal_ref).flatten(1).sum(1))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_noise_level_zero_is_diffusers_flow_match_euler_step(shift: float) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(4)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    sigmas = scheduler.sigmas
    for i, timestep in enumerate(scheduler.timesteps):
        v = torch.randn(x.shape, generator=gen)
        expected = scheduler.step(v, timestep, x).prev_sample
        dist = flow_sde_step_distribution(v, x, sigmas[i].expand(2), sigmas[i + 1].expand(2), 0.0, t_cap=sigmas[1])
        assert bool((dist.std == 0).all())
        torch.testing.assert_close(dist.mean, expected)
        x = expected


def gaussian_data_velocity(x: torch.Tensor, t: float, m: float, s0: float) -> torch.Tensor:
    """The exact velocity E[eps - x_0 | x_t] of data x_0 ~ N(m, s0^2) under x_t = (1 - t) x_0 + t eps."""
    var_t = (1 - t) ** 2 * s0**2 + t**2
    centred = x - (1 - t) * m
    return t / var_t * centred - (m + (1 - t) * s0**2 / var_t * centred)


@pytest.mark.parametrize("noise_level", [0.0, 0.7, 1.0])
def test_the_sde_keeps_the_marginals_of_gaussian_data(noise_level: float) -> None:
    # x_t ~ p_t = N((1 - t) m, (1 - t)^2 s0^2 + t^2) exactly; 40 SDE steps t = 0.5 -> 0.3 must land on p_0.3
    m, s0, n = 1.5, 0.5, 400_000
    gen = torch.Generator().manual_seed(2)
    times = torch.linspace(0.5, 0.3, 41, dtype=torch.float64).tolist()
    x = (1 - times[0]) * m + math.sqrt((1 - times[0]) ** 2 * s0**2 + times[0] ** 2) * torch.randn(n, 1, generator=gen)
    naive = x.clone()
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        dist = flow_sde_step_distribution(gaussian_data_velocity(x, t, m, s0), x, t, t_next, noise_level)
        x = ddim_sample_next(dist, torch.randn(n, 1, generator=gen))
        # the same noise without the score correction drifts away from p_t
        naive = naive + (t_next - t) * gaussian_data_velocity(naive, t, m, s0) + dist.std * torch.randn(n, 1, generator=gen)
    t = times[-1]
    mean, var = (1 - t) * m, (1 - t) ** 2 * s0**2 + t**2
    assert abs(x.mean().item() - mean) < 0.01 and abs(x.var().item() / var - 1) < 0.02
    if noise_level > 0:
        assert abs(naive.var().item() / var - 1) > 0.1


def test_the_flow_forward_process_and_its_velocity_target_invert_each_other() -> None:
    # the supervised losses and DiffusionNFT noise x_0 with x_t = (1 - t) x_0 + t eps and regress v = eps - x_0:
    # the x_0 prediction x_t - t v of that target gives back x_0, and v is d x_t / dt
    from dpok.core import flow_forward, flow_velocity_target, flow_x0_prediction

    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, 2, 3, 3, generator=gen)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = flow_forward(x0, eps, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[3], eps[3])
    v = flow_velocity_target(x0, eps)
    torch.testing.assert_close(flow_x0_prediction(x_t, t, v), x0, atol=1e-6, rtol=0)
    dt = 1e-3
    torch.testing.assert_close((flow_forward(x0, eps, t + dt) - x_t) / dt, v, atol=1e-3, rtol=0)
