"""Policy-gradient and supervised losses for diffusion fine-tuning (DDPO, DPOK, SFT-KL, RWR).

Every loss returns ``(loss, stats)``: a scalar tensor to back-propagate and a dict of python
floats for logging. The policy losses work on flat per-transition tensors of shape (N,), one
entry per (trajectory, denoising step). Quantities that come from the rollout (old_log_probs,
advantages, rewards, reference predictions, weights) are detached, since they are constants
of the objective and must not receive gradients even if the caller forgot ``no_grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

LossOutput = tuple[Tensor, dict[str, float]]
SURROGATES = ("clamp", "ppo")


def _check_per_transition(**tensors: Tensor) -> int:
    """Check every tensor is 1-D with the same length; return that length."""
    (first_name, first), *rest = tensors.items()
    if first.ndim != 1:
        raise ValueError(f"{first_name} must have shape (N,), got {tuple(first.shape)}")
    for name, tensor in rest:
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} must have shape {tuple(first.shape)} like {first_name}, got {tuple(tensor.shape)}"
            )
    if first.shape[0] == 0:
        raise ValueError(f"{first_name} is empty")
    return first.shape[0]


def _check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _check_non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")


def _ratio_stats(log_probs: Tensor, old_log_probs: Tensor, clip_range: float) -> tuple[Tensor, dict[str, float]]:
    """ratio = exp(log_probs - old_log_probs) and its diagnostics (clip_fraction, approx_kl, ratio_*)."""
    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    with torch.no_grad():
        stats = {
            "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean().item(),
            # Second-order estimate of KL(old || new), as logged by DDPO.
            "approx_kl": (0.5 * log_ratio**2).mean().item(),
            "ratio_mean": ratio.mean().item(),
            "ratio_min": ratio.min().item(),
            "ratio_max": ratio.max().item(),
        }
    return ratio, stats


def ddpo_is_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float) -> LossOutput:
    """DDPO-IS: the PPO clipped surrogate on per-step importance ratios.

        ratio_n = exp(log_probs_n - old_log_probs_n)
        loss    = mean_n max(-A_n ratio_n, -A_n clamp(ratio_n, 1 - eps, 1 + eps))

    Args:
        log_probs: (N,) log-probs of the taken steps under the current policy (with grad).
        old_log_probs: (N,) log-probs recorded at sampling time.
        advantages: (N,).
        clip_range: eps > 0.

    Returns:
        loss and stats {"policy_loss", "clip_fraction", "approx_kl", "ratio_mean", "ratio_min", "ratio_max"}.
    """
    _check_per_transition(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages)
    _check_positive("clip_range", clip_range)
    advantages = advantages.detach()
    ratio, stats = _ratio_stats(log_probs, old_log_probs.detach(), clip_range)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    return loss, {"policy_loss": loss.item(), **stats}


def ddpo_sf_loss(log_probs: Tensor, advantages: Tensor) -> LossOutput:
    """DDPO-SF: REINFORCE / score-function estimator, valid only on-policy.

        loss = -mean_n A_n log_probs_n,   so   grad loss = -(1/N) sum_n A_n grad log p_n

    Args:
        log_probs: (N,) with grad; advantages: (N,).

    Returns:
        loss and stats {"policy_loss", "log_prob_mean"}.
    """
    _check_per_transition(log_probs=log_probs, advantages=advantages)
    loss = -(advantages.detach() * log_probs).mean()
    return loss, {"policy_loss": loss.item(), "log_prob_mean": log_probs.detach().mean().item()}


def dpok_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    kl: Tensor,
    alpha: float,
    beta: float,
    clip_range: float,
    surrogate: str = "clamp",
) -> LossOutput:
    """DPOK's KL-regularised policy loss (clipped importance-weighted policy gradient + KL penalty).

        ratio_n = exp(log_probs_n - old_log_probs_n)
        clamp:  loss = mean_n [ -alpha A_n clamp(ratio_n, 1 - eps, 1 + eps) + beta kl_n ]
        ppo:    loss = mean_n [ alpha max(-A_n ratio_n, -A_n clamp(ratio_n, 1 - eps, 1 + eps)) + beta kl_n ]

    ``clamp`` is the official DPOK code: the ratio itself is clamped, so a transition whose ratio
    left [1 - eps, 1 + eps] contributes no policy gradient whatever the sign of A_n, including
    the transitions whose ratio moved the wrong way. ``ppo`` is PPO's pessimistic min/max
    surrogate (as DDPO-IS and GRPO): only moves that already improved the objective beyond the
    band stop giving gradient, so a transition pushed the wrong way is pulled back.

    Args:
        log_probs, old_log_probs, advantages: (N,) as in :func:`ddpo_is_loss`.
        kl: (N,) per-step KL between the fine-tuned and the pre-trained policy (with grad), e.g.
            :func:`dpok.core.gaussian.gaussian_kl_same_std` of the two step means.
        alpha: weight of the reward term (>= 0).
        beta: weight of the KL term (>= 0).
        clip_range: eps > 0.
        surrogate: "clamp" (DPOK code) or "ppo" (min/max).

    Returns:
        loss and stats {"policy_loss" (the -alpha A ratio part), "kl", "kl_loss" (beta * kl),
        "clip_fraction", "approx_kl", "ratio_mean", "ratio_min", "ratio_max"}.
    """
    _check_per_transition(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages, kl=kl)
    _check_non_negative("alpha", alpha)
    _check_non_negative("beta", beta)
    _check_positive("clip_range", clip_range)
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    ratio, stats = _ratio_stats(log_probs, old_log_probs.detach(), clip_range)
    advantages = advantages.detach()
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    per_transition = clipped if surrogate == "clamp" else torch.maximum(-advantages * ratio, clipped)
    policy_loss = alpha * per_transition.mean()
    kl_mean = kl.mean()
    kl_loss = beta * kl_mean
    loss = policy_loss + kl_loss
    return loss, {"policy_loss": policy_loss.item(), "kl": kl_mean.item(), "kl_loss": kl_loss.item(), **stats}


def value_loss(values: Tensor, rewards: Tensor) -> LossOutput:
    """Mean squared error of a value baseline: loss = mean_n (values_n - rewards_n)^2.

    Args:
        values: (N,) predictions with grad; rewards: (N,) targets.

    Returns:
        loss and stats {"value_loss", "value_mean"}.
    """
    _check_per_transition(values=values, rewards=rewards)
    loss = ((values - rewards.detach()) ** 2).mean()
    return loss, {"value_loss": loss.item(), "value_mean": values.detach().mean().item()}


def _per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """mean over the non-batch dims of (target - prediction)^2; (N, ...) -> (N,)."""
    return ((target - prediction) ** 2).flatten(start_dim=1).mean(dim=1)


def _check_eps_tensors(weights: Tensor, **tensors: Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    if first.ndim < 2:
        raise ValueError(f"{first_name} must have shape (N, ...) with data dims, got {tuple(first.shape)}")
    for name, tensor in rest:
        if tensor.shape != first.shape:
            raise ValueError(
                f"{name} must have shape {tuple(first.shape)} like {first_name}, got {tuple(tensor.shape)}"
            )
    if weights.shape != first.shape[:1]:
        raise ValueError(f"weights must have shape ({first.shape[0]},), got {tuple(weights.shape)}")


def sft_kl_loss(eps_pred: Tensor, eps_target: Tensor, eps_ref: Tensor, weights: Tensor, gamma: float) -> LossOutput:
    """DPOK's supervised baseline: reward-weighted denoising loss plus a KL to the pre-trained model.

        denoise = mean_n [ w_n mean_chw (eps_target - eps_pred)^2 ]
        kl      = mean_n [ mean_chw (eps_ref - eps_pred)^2 ]
        loss    = denoise + gamma kl

    The squared distance between the two noise predictions is (up to a per-step constant) the KL
    between the two step Gaussians, which is why it serves as the regulariser.

    Args:
        eps_pred: (N, C, H, W) noise predicted by the fine-tuned model (with grad).
        eps_target: (N, C, H, W) the noise that was added.
        eps_ref: (N, C, H, W) the pre-trained model's prediction.
        weights: (N,) per-sample weights (the rewards).
        gamma: KL weight (>= 0).

    Returns:
        loss and stats {"denoise_loss", "kl", "kl_loss" (gamma * kl)}.
    """
    _check_eps_tensors(weights, eps_pred=eps_pred, eps_target=eps_target, eps_ref=eps_ref)
    _check_non_negative("gamma", gamma)
    denoise = (weights.detach() * _per_sample_mse(eps_pred, eps_target.detach())).mean()
    kl = _per_sample_mse(eps_pred, eps_ref.detach()).mean()
    kl_loss = gamma * kl
    loss = denoise + kl_loss
    return loss, {"denoise_loss": denoise.item(), "kl": kl.item(), "kl_loss": kl_loss.item()}


def sft_weights(rewards: Tensor) -> Tensor:
    """SFT-KL's per-sample weights: the rewards, shifted so that none is negative.

        w_n = r_n - min(0, min_m r_m)

    Rewards in [0, inf) are used as they are (the paper's reward-weighted loss); with negative
    rewards (ImageReward is roughly standard normal) a raw weight < 0 would make
    w ||eps - eps_theta||^2 unbounded below. Non-finite rewards get weight 0.

    Args:
        rewards: (N,).

    Returns:
        weights (N,) >= 0, detached.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape (N,), got {tuple(rewards.shape)}")
    rewards = rewards.detach()
    finite = torch.isfinite(rewards)
    if not bool(finite.any()):
        return torch.zeros_like(rewards)
    shift = rewards[finite].min().clamp(max=0.0)
    return torch.where(finite, rewards - shift, torch.zeros_like(rewards))


def rwr_weights(rewards: Tensor, temperature: float) -> Tensor:
    """Reward-weighted-regression weights w = N softmax(r / temperature).

    Scaled by N so the weights have mean 1 and the loss keeps the scale of the unweighted
    denoising loss whatever the batch size. Non-finite rewards get weight 0 (the remaining
    weights still sum to N); a batch without any finite reward gets all-zero weights.

    Args:
        rewards: (N,); temperature: > 0, lower is greedier.

    Returns:
        weights (N,), detached.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape (N,), got {tuple(rewards.shape)}")
    _check_positive("temperature", temperature)
    rewards = rewards.detach()
    finite = torch.isfinite(rewards)
    if not bool(finite.any()):
        return torch.zeros_like(rewards)
    logits = torch.where(finite, rewards / temperature, torch.full_like(rewards, float("-inf")))
    return torch.softmax(logits, dim=0) * rewards.shape[0]


def rwr_sparse_weights(rewards: Tensor, percentile: float) -> Tensor:
    """Sparse RWR weights: 1 for rewards at or above the ``percentile``-th percentile of the batch, else 0.

    The percentile (0-100) is taken over the finite rewards with linear interpolation (as
    ``numpy.percentile``). Kept samples have weight exactly 1, so the mean weight over the kept
    samples is 1; note that :func:`rwr_loss` averages over all N, so its value scales with the
    kept fraction. Non-finite rewards get weight 0.

    Returns:
        weights (N,) of 0.0 / 1.0 in the dtype of ``rewards``.
    """
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape (N,), got {tuple(rewards.shape)}")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
    rewards = rewards.detach()
    finite = torch.isfinite(rewards)
    if not bool(finite.any()):
        return torch.zeros_like(rewards)
    threshold = torch.quantile(rewards[finite].double(), percentile / 100.0)
    return (finite & (rewards.double() >= threshold)).to(rewards.dtype)


def rwr_loss(eps_pred: Tensor, eps_target: Tensor, weights: Tensor) -> LossOutput:
    """Reward-weighted denoising loss: loss = mean_n [ w_n mean_chw (eps_target - eps_pred)^2 ].

    Args:
        eps_pred: (N, C, H, W) with grad; eps_target: (N, C, H, W); weights: (N,) from
            :func:`rwr_weights` or :func:`rwr_sparse_weights`.

    Returns:
        loss and stats {"rwr_loss", "weight_mean"}.
    """
    _check_eps_tensors(weights, eps_pred=eps_pred, eps_target=eps_target)
    loss = (weights.detach() * _per_sample_mse(eps_pred, eps_target.detach())).mean()
    return loss, {"rwr_loss": loss.item(), "weight_mean": weights.detach().float().mean().item()}


def grpo_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, kl: Tensor, beta: float,
              clip_range: float) -> LossOutput:
    """GRPO for diffusion (Flow-GRPO, DanceGRPO): PPO's clipped surrogate on group-relative
    advantages plus a per-step KL to the reference policy, no value function:

        loss = mean_n [ max(-A_n ratio_n, -A_n clamp(ratio_n, 1 - eps, 1 + eps)) + beta kl_n ]

    It is :func:`dpok_loss` with alpha = 1 and the PPO surrogate, and :func:`ddpo_is_loss` when
    beta = 0. Shapes and stats as in :func:`dpok_loss`.
    """
    return dpok_loss(log_probs, old_log_probs, advantages, kl, 1.0, beta, clip_range, "ppo")

