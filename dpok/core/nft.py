"""DiffusionNFT (Zheng et al., ICLR 2026, arXiv 2509.16117): online RL on the forward process.

Clean samples x_0 of the sampling policy v_old are scored; each reward becomes an optimality
probability r in [0, 1]. The trained network v_theta and v_old define two implicit policies

    v+ = beta v_theta + (1 - beta) v_old          (positive: where good samples pull)
    v- = (1 + beta) v_old - beta v_theta          (negative: its mirror image about v_old)

and the loss is the denoising loss of v+ on the good samples and of v- on the bad ones, on
freshly noised x_t (no trajectories, no likelihoods):

    L = E_{x_0, t, eps} [ r ||x0(v+) - x_0||^2 / w+  +  (1 - r) ||x0(v-) - x_0||^2 / w- ] / beta

with the adaptive weights w = mean |x0(v) - x_0| (no gradient) of the authors' code.

The paper writes it for velocity prediction (rectified flow, x_t = (1 - t) x_0 + t eps, v = eps -
x_0, x0(v) = x_t - t v). Every parametrisation in use (velocity, eps, v-prediction, x_0) turns a
network output into an x_0 prediction by an affine map x0 = a(t) x_t + b(t) output with the same
a, b for every network at the same (x_t, t); so the x_0 prediction of v+ is beta x0(v_theta) +
(1 - beta) x0(v_old), and the same for v-. The loss is therefore written once on x_0 predictions:
for an eps-model x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), for a flow model x0 = x_t - t v.
The two frames name the same noisy point when x_t^flow = x_t^VP / (sqrt(abar_t) + sqrt(1 - abar_t))
and t = sqrt(1 - abar_t) / (sqrt(abar_t) + sqrt(1 - abar_t)), and then give the same loss (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .losses import LossOutput


def flow_x0_prediction(latents: Tensor, t: Tensor, velocity: Tensor) -> Tensor:
    """x0 = x_t - t v of rectified flow (x_t = (1 - t) x_0 + t eps, v = eps - x_0).

    latents, velocity: (B, ...); t: (B,) in [0, 1]."""
    return latents - t.view(-1, *([1] * (latents.ndim - 1))) * velocity


def vp_to_flow(latents: Tensor, abar_t: Tensor) -> tuple[Tensor, Tensor]:
    """The rectified-flow point (x_t^flow, t) of a variance-preserving one (x_t^VP, abar_t):
    x^VP = sqrt(abar) x_0 + sqrt(1 - abar) eps divided by s = sqrt(abar) + sqrt(1 - abar) is
    (1 - t) x_0 + t eps with t = sqrt(1 - abar) / s. latents (B, ...), abar_t (B,)."""
    a, s = abar_t.sqrt(), (1.0 - abar_t).sqrt()
    scale = (a + s).view(-1, *([1] * (latents.ndim - 1)))
    return latents / scale, s / (a + s)


def nft_optimality(advantages: Tensor, adv_clip: float) -> Tensor:
    """r = clamp(A, -c, c) / (2 c) + 1/2 in [0, 1] (N,): 1/2 is neutral, 1 all positive, 0 all negative."""
    if adv_clip <= 0:
        raise ValueError(f"adv_clip must be positive, got {adv_clip}")
    return (advantages.clamp(-adv_clip, adv_clip) / adv_clip / 2.0 + 0.5).clamp(0.0, 1.0)


def _weighted_error(x0_hat: Tensor, x0: Tensor) -> Tensor:
    """||x0_hat - x0||^2 / w per sample (mean over elements), w = mean |x0_hat - x0| without gradient."""
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        w = (x0_hat.double() - x0.double()).abs().mean(dims, keepdim=True).clamp_min(1e-5).to(x0_hat.dtype)
    return ((x0_hat - x0) ** 2 / w).mean(dims)


def nft_loss(x0_theta: Tensor, x0_old: Tensor, x0: Tensor, r: Tensor, beta: float, scale: float = 1.0) -> LossOutput:
    """The DiffusionNFT policy loss on x_0 predictions.

    Args:
        x0_theta: (B, ...) x_0 predicted by the trained network (with grad).
        x0_old: (B, ...) x_0 predicted by the sampling policy at the same (x_t, t) (no grad).
        x0: (B, ...) the clean samples that were scored.
        r: (B,) optimality probabilities in [0, 1] (:func:`nft_optimality`).
        beta: > 0, the strength of the implicit guidance (1 in the authors' CFG-free setting).
        scale: constant factor on the loss (the authors' code multiplies by its advantage clip).

    Returns:
        loss = scale * mean_b [ r_b e+_b + (1 - r_b) e-_b ] / beta and stats {"policy_loss",
        "positive_loss", "negative_loss", "old_deviation" (mean squared x0_theta - x0_old)}.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    if not (x0_theta.shape == x0_old.shape == x0.shape) or r.shape != x0.shape[:1]:
        raise ValueError(f"shapes differ: x0_theta {tuple(x0_theta.shape)}, x0_old {tuple(x0_old.shape)}, "
                         f"x0 {tuple(x0.shape)}, r {tuple(r.shape)} (want (B,))")
    x0_old, x0, r = x0_old.detach(), x0.detach(), r.detach()
    positive = _weighted_error(beta * x0_theta + (1.0 - beta) * x0_old, x0)
    negative = _weighted_error((1.0 + beta) * x0_old - beta * x0_theta, x0)
    loss = scale * (r * positive + (1.0 - r) * negative).mean() / beta
    return loss, {"policy_loss": loss.item(), "positive_loss": positive.mean().item(),
                  "negative_loss": negative.mean().item(),
                  "old_deviation": (x0_theta.detach() - x0_old).pow(2).mean().item()}


def old_policy_decay(step: int, rate: float, limit: float) -> float:
    """The sampling policy's EMA decay after ``step`` optimizer steps: min(rate * step, limit)
    (the authors' schedule: 0 at first, i.e. fully on-policy, then slower and slower)."""
    return min(rate * step, limit)
