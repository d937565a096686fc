"""Reverse-diffusion steps written as explicit Gaussian policies.

DDPO and DPOK treat every denoising step as an action of a stochastic policy

    pi(x_{t-1} | x_t, c) = N(mean, std^2 I)

so the scheduler update has to be exposed as a distribution (for log-probs and KLs) rather than
as a sampled tensor. Everything here is batched over per-sample timesteps, which lets a training
step evaluate transitions from different points of different trajectories at once.

Notation: ``abar_t = alphas_cumprod[t]``, ``abar_prev = alphas_cumprod[prev_t]`` when ``prev_t >= 0``
and ``final_alpha_cumprod`` otherwise; ``x0_hat`` is the predicted clean sample and ``eps_hat`` the
predicted noise. The predicted ``x0_hat`` is never clipped or thresholded: clipping would make the
mean a non-smooth function of the network output and is disabled in the latent-diffusion
schedulers these formulas are checked against (``clip_sample=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dpok.core.gaussian import expand_per_sample, gaussian_log_prob

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class StepDistribution:
    """The Gaussian ``N(mean, std^2 I)`` of one reverse step for a batch of latents.

    Attributes:
        mean: (B, ...) float32, the mean of x_{t-1}.
        std: (B, 1, ..., 1) float32, broadcastable to ``mean``; 0 for a deterministic step.
        pred_original_sample: (B, ...) float32, x0_hat.
    """

    mean: Tensor
    std: Tensor
    pred_original_sample: Tensor


def previous_timestep(timesteps: Tensor | int, num_train_timesteps: int, num_inference_steps: int) -> Tensor:
    """Timestep reached by one inference step from ``timesteps`` (diffusers' DDIM convention).

        prev_t = t - num_train_timesteps // num_inference_steps

    A negative result means "past the end of the chain": the step then uses ``final_alpha_cumprod``.

    Returns:
        long tensor with the shape of ``timesteps``.
    """
    if num_inference_steps <= 0:
        raise ValueError(f"num_inference_steps must be positive, got {num_inference_steps}")
    if num_train_timesteps <= 0:
        raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
    return torch.as_tensor(timesteps).long() - num_train_timesteps // num_inference_steps


def _per_sample_long(value: Tensor | int, batch: int, device: torch.device, name: str) -> Tensor:
    value = torch.as_tensor(value, device=device).long().reshape(-1)
    if value.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {value.shape[0]} entries")
    # Accepting a scalar is convenient for samplers where the whole batch is at the same step.
    return value.expand(batch)


def _gather_schedule(
    alphas_cumprod: Tensor,
    timesteps: Tensor | int,
    prev_timesteps: Tensor | int,
    final_alpha_cumprod: Tensor | float,
    latents: Tensor,
) -> tuple[Tensor, Tensor]:
    """Look up (abar_t, abar_prev), each of shape (B, 1, ..., 1) in float32 on ``latents.device``."""
    if alphas_cumprod.ndim != 1:
        raise ValueError(f"alphas_cumprod must be 1-D, got shape {tuple(alphas_cumprod.shape)}")
    batch = latents.shape[0]
    device = latents.device
    schedule = alphas_cumprod.to(device=device, dtype=torch.float32)
    t = _per_sample_long(timesteps, batch, device, "timesteps")
    prev_t = _per_sample_long(prev_timesteps, batch, device, "prev_timesteps")
    num_train = schedule.shape[0]
    if bool(((t < 0) | (t >= num_train)).any()):
        raise ValueError(f"timesteps must lie in [0, {num_train}), got {t.tolist()}")
    if bool((prev_t >= num_train).any()):
        raise ValueError(f"prev_timesteps must be < {num_train}, got {prev_t.tolist()}")
    final = torch.as_tensor(final_alpha_cumprod, device=device, dtype=torch.float32)
    abar_t = schedule[t]
    # clamp only makes the gather legal; the where() discards those entries.
    abar_prev = torch.where(prev_t >= 0, schedule[prev_t.clamp(min=0)], final)
    return expand_per_sample(abar_t, latents), expand_per_sample(abar_prev, latents)


def predict_x0_and_eps(
    model_output: Tensor, latents: Tensor, abar_t: Tensor, prediction_type: str = "epsilon"
) -> tuple[Tensor, Tensor]:
    """Convert a network output into (x0_hat, eps_hat) using x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.

    - "epsilon": eps_hat = output, x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)
    - "v_prediction": x0_hat = sqrt(abar_t) x_t - sqrt(1 - abar_t) v, eps_hat = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
    - "sample": x0_hat = output, eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)

    Args:
        model_output, latents: (B, ...), same dtype as each other after the caller's casting.
        abar_t: broadcastable to latents, e.g. (B, 1, 1, 1).
    """
    sqrt_abar = abar_t.sqrt()
    sqrt_one_minus_abar = (1.0 - abar_t).sqrt()
    if prediction_type == "epsilon":
        eps_hat = model_output
        x0_hat = (latents - sqrt_one_minus_abar * eps_hat) / sqrt_abar
    elif prediction_type == "v_prediction":
        x0_hat = sqrt_abar * latents - sqrt_one_minus_abar * model_output
        eps_hat = sqrt_abar * model_output + sqrt_one_minus_abar * latents
    elif prediction_type == "sample":
        x0_hat = model_output
        eps_hat = (latents - sqrt_abar * x0_hat) / sqrt_one_minus_abar
    else:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return x0_hat, eps_hat


def _as_float32(model_output: Tensor, latents: Tensor) -> tuple[Tensor, Tensor]:
    if model_output.shape != latents.shape:
        raise ValueError(
            f"model_output and latents must have the same shape, got {tuple(model_output.shape)} "
            f"and {tuple(latents.shape)}"
        )
    # Half-precision sqrt(1 - abar) terms near t = 0 and the division by sqrt(abar) near t = T
    # lose too many digits for log-prob ratios, so the step is always evaluated in float32.
    return model_output.float(), latents.float()


def ddim_step_distribution(
    model_output: Tensor,
    latents: Tensor,
    timesteps: Tensor | int,
    prev_timesteps: Tensor | int,
    alphas_cumprod: Tensor,
    eta: float,
    final_alpha_cumprod: Tensor | float,
    prediction_type: str = "epsilon",
) -> StepDistribution:
    """The DDIM (eta > 0) reverse step as a Gaussian policy (DDIM paper eq. 12, DDPO/DPOK's policy).

        sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
        mean    = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat
        x_{t-1} ~ N(mean, sigma_t^2 I)

    x0_hat is not clipped (see module docstring). eta = 0 is accepted (std = 0, the deterministic
    DDIM update) but such a step has no log-prob.

    Args:
        model_output: network output (B, ...), interpreted according to ``prediction_type``.
        latents: x_t, (B, ...).
        timesteps: t, long (B,) (or a scalar shared by the batch).
        prev_timesteps: prev_t, long (B,) (or scalar); see :func:`previous_timestep`.
        alphas_cumprod: (num_train_timesteps,) training schedule abar.
        eta: DDIM stochasticity in [0, 1]; 1 gives the DDPM posterior variance.
        final_alpha_cumprod: abar used when prev_t < 0.
        prediction_type: "epsilon", "v_prediction" or "sample".

    Returns:
        StepDistribution with float32 mean (B, ...), std (B, 1, ..., 1) and pred_original_sample (B, ...).
    """
    if not 0.0 <= eta <= 1.0:
        # eta > 1 makes 1 - abar_prev - sigma_t^2 negative, i.e. the mean undefined.
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    model_output, latents = _as_float32(model_output, latents)
    abar_t, abar_prev = _gather_schedule(alphas_cumprod, timesteps, prev_timesteps, final_alpha_cumprod, latents)
    x0_hat, eps_hat = predict_x0_and_eps(model_output, latents, abar_t, prediction_type)
    variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
    std = eta * variance.sqrt()
    # At eta = 1 this is analytically >= 0 but can round to a tiny negative number in float32.
    direction_coef = (1.0 - abar_prev - std**2).clamp(min=0.0).sqrt()
    mean = abar_prev.sqrt() * x0_hat + direction_coef * eps_hat
    return StepDistribution(mean=mean, std=std, pred_original_sample=x0_hat)


def ddim_log_prob(next_latents: Tensor, dist: StepDistribution, reduce: str = "sum") -> Tensor:
    """log pi(next_latents | x_t) = log N(next_latents; dist.mean, dist.std^2 I), per sample.

    Args:
        next_latents: x_{t-1}, (B, ...).
        dist: the step distribution of x_t.
        reduce: "sum" (joint log-prob, as in DDPO/DPOK) or "mean" over the non-batch dims.

    Returns:
        log_probs of shape (B,), float32.

    Raises:
        ValueError: if any std is 0 (eta = 0, or the last DDPM step), where the density is degenerate.
    """
    if bool((dist.std <= 0).any()):
        raise ValueError(
            "the step distribution has std = 0 (deterministic DDIM): eta = 0 has no log-prob; use eta > 0 for training"
        )
    return gaussian_log_prob(next_latents.float(), dist.mean, dist.std, reduce=reduce)


def ddim_sample_next(dist: StepDistribution, noise: Tensor) -> Tensor:
    """Sample x_{t-1} = mean + std * noise with ``noise ~ N(0, I)`` of shape (B, ...); returns (B, ...)."""
    if noise.shape != dist.mean.shape:
        raise ValueError(f"noise must have shape {tuple(dist.mean.shape)}, got {tuple(noise.shape)}")
    return dist.mean + dist.std * noise.to(dist.mean.dtype)
