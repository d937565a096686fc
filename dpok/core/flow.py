"""The rectified-flow Euler step as a Gaussian policy: Flow-GRPO's reverse-time SDE.

Flow-matching models (SD3, SD3.5, FLUX) interpolate x_t = (1 - t) x_0 + t eps, t in [0, 1] (``t`` is
diffusers' ``sigma``; the network sees ``timestep = 1000 t``), and predict the velocity
v = eps - x_0. Their sampler integrates the ODE dx = v dt from t = 1 to t = 0, which is
deterministic and so has no log-prob. Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, eq. 8-9)
replaces it with a reverse-time SDE that has the same marginals p_t for every noise level a:

    dx_t = [v_t(x_t) + sigma_t^2 / (2t) (x_t + (1 - t) v_t(x_t))] dt + sigma_t dw,
    sigma_t = a sqrt(t / (1 - t))

and one Euler-Maruyama step of it from t to t_next = t + dt (dt < 0) is the Gaussian policy

    mean = x_t + dt [v + sigma_t^2 / (2t) (x_t + (1 - t) v)]
    std  = sigma_t sqrt(-dt)
    x_{t_next} ~ N(mean, std^2 I)

returned as the same :class:`StepDistribution` as the DDIM step, so ``ddim_log_prob``,
``ddim_sample_next`` and the closed-form ``step_kl`` apply unchanged. a = 0 gives std = 0 and
mean = x_t + dt v: the plain Euler step of diffusers' ``FlowMatchEulerDiscreteScheduler``.

sigma_t is infinite at t = 1 (the first step of every schedule). Like the authors' code, the
``1 - t`` under the root is then taken at ``t_cap``, the schedule's largest t below 1 (its second
entry), which keeps the first step's noise of the same size as the second's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpok.core.ddim import StepDistribution, _as_float32
from dpok.core.gaussian import expand_per_sample


def _per_sample_time(value: Tensor | float, latents: Tensor, name: str) -> Tensor:
    """A scalar or (B,) time as (B, 1, ..., 1) float32 on ``latents.device``."""
    value = torch.as_tensor(value, dtype=torch.float32, device=latents.device).reshape(-1)
    batch = latents.shape[0]
    if value.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {value.shape[0]} entries")
    return expand_per_sample(value.expand(batch), latents)


def flow_sde_sigma(t: Tensor, noise_level: float, t_cap: Tensor | float | None = None) -> Tensor:
    """The SDE's diffusion coefficient sigma_t = a sqrt(t / (1 - t)), with 1 - t_cap used where t = 1.

    Args:
        t: times in [0, 1], any shape (float32 or wider).
        noise_level: a >= 0.
        t_cap: a time < 1 whose 1 - t_cap replaces 1 - t where t = 1; required when any t = 1.

    Returns:
        sigma_t, same shape as ``t``.
    """
    if noise_level < 0:
        raise ValueError(f"the noise level a must be >= 0, got {noise_level}")
    at_one = t >= 1.0
    if bool(at_one.any()):
        if t_cap is None or not float(t_cap) < 1.0:
            raise ValueError(f"a step from t = 1 needs t_cap < 1 (the schedule's second time), got {t_cap}")
        t_cap = torch.as_tensor(t_cap, dtype=t.dtype, device=t.device)
        t_safe = torch.where(at_one, t_cap, t)
    else:
        t_safe = t
    return noise_level * (t / (1.0 - t_safe)).sqrt()


def flow_sde_step_distribution(
    velocity: Tensor,
    latents: Tensor,
    t: Tensor | float,
    t_next: Tensor | float,
    noise_level: float,
    t_cap: Tensor | float | None = None,
) -> StepDistribution:
    """One step t -> t_next of Flow-GRPO's marginal-preserving SDE as a Gaussian (see module docstring).

        dt      = t_next - t                                     (< 0)
        sigma_t = a sqrt(t / (1 - t))
        mean    = x_t + dt [v + sigma_t^2 / (2t) (x_t + (1 - t) v)]
        std     = sigma_t sqrt(-dt)
        x0_hat  = x_t - t v

    Args:
        velocity: the network's v (B, ...) at x_t.
        latents: x_t (B, ...).
        t: current time, (B,) or scalar, in (0, 1].
        t_next: next time, (B,) or scalar, in [0, t).
        noise_level: a >= 0 (Flow-GRPO trains with 0.7); 0 is the deterministic Euler step (std 0).
        t_cap: the schedule's largest time below 1, used for sigma_t at t = 1 (see :func:`flow_sde_sigma`).

    Returns:
        StepDistribution with float32 mean (B, ...), std (B, 1, ..., 1) and pred_original_sample (B, ...).
    """
    velocity, latents = _as_float32(velocity, latents)
    t, t_next = _per_sample_time(t, latents, "t"), _per_sample_time(t_next, latents, "t_next")
    if bool((t <= 0).any()) or bool((t_next >= t).any()) or bool((t_next < 0).any()):
        raise ValueError("a flow step needs 0 <= t_next < t <= 1")
    dt = t_next - t
    sigma_t = flow_sde_sigma(t, noise_level, t_cap)
    # the score term: grad log p_t(x) = -(x + (1 - t) v) / t for rectified flow
    drift = velocity + sigma_t**2 / (2.0 * t) * (latents + (1.0 - t) * velocity)
    mean = latents + dt * drift
    std = sigma_t * (-dt).sqrt()
    return StepDistribution(mean=mean, std=std, pred_original_sample=latents - t * velocity)


def flow_forward(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The rectified-flow forward process x_t = (1 - t) x_0 + t eps.

    x0, noise: (B, ...); t: (B,) in [0, 1]. Returns x_t (B, ...), in x0's dtype."""
    t = _per_sample_time(t, x0, "t").to(x0.dtype)
    return (1.0 - t) * x0 + t * noise


def flow_velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The velocity a flow model should output at any x_t of the pair (x_0, eps): v = eps - x_0 (B, ...)."""
    return noise - x0
