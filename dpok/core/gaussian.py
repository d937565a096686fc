"""Diagonal Gaussian densities used by the diffusion policies.

Every reverse-diffusion step with a fixed variance is a diagonal Gaussian
``N(mean, std^2 I)`` over the whole latent, so the policy log-likelihood of a
transition and the per-step KL between two policies both reduce to the
closed forms below.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_REDUCTIONS = ("sum", "mean")
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Densities of half-precision latents lose most of their digits when summed over
    # thousands of elements, so compute in at least float32 (float64 stays float64).
    return torch.promote_types(dtype, torch.float32)


def expand_per_sample(value: Tensor | float, like: Tensor) -> Tensor:
    """Reshape a per-sample quantity so it broadcasts against ``like``.

    Args:
        value: scalar, (B,), or already broadcastable (e.g. (B, 1, 1, 1)).
        like: tensor of shape (B, ...).

    Returns:
        ``value`` as a tensor on ``like``'s device, of shape (B, 1, ..., 1) when it was (B,),
        otherwise unchanged in shape.
    """
    if not isinstance(value, Tensor) and like.is_floating_point():
        # A python float would otherwise become float32 and lose digits in float64 computations.
        value = torch.tensor(value, dtype=like.dtype)
    value = torch.as_tensor(value, device=like.device)
    # A 1-D tensor of length B means "one value per sample", not "one value per last-dim entry",
    # which is what plain broadcasting would (silently) do.
    if value.ndim == 1 and like.ndim > 1 and value.shape[0] == like.shape[0]:
        value = value.reshape(value.shape[0], *([1] * (like.ndim - 1)))
    return value


def _check_std_broadcasts(std: Tensor, like: Tensor) -> None:
    # A std with extra or larger dims would silently enlarge the result and change what "sum" means.
    try:
        compatible = torch.broadcast_shapes(std.shape, like.shape) == like.shape
    except RuntimeError:
        compatible = False
    if not compatible:
        raise ValueError(f"std of shape {tuple(std.shape)} does not broadcast to {tuple(like.shape)}")


def reduce_non_batch(values: Tensor, reduce: str) -> Tensor:
    """Sum or average ``values`` (B, ...) over every dimension except the first; returns (B,)."""
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    if values.ndim <= 1:
        return values
    dims = tuple(range(1, values.ndim))
    return values.sum(dim=dims) if reduce == "sum" else values.mean(dim=dims)


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float, reduce: str = "sum") -> Tensor:
    """Log-density of ``x`` under the diagonal Gaussian ``N(mean, std^2 I)``, per sample.

    Implements, element-wise and then reduced over the non-batch dims,

        log p(x) = -(x - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)

    Args:
        x: samples, shape (B, ...).
        mean: means, same shape as ``x``.
        std: standard deviations: scalar, (B,) or broadcastable such as (B, 1, 1, 1). Must be > 0.
        reduce: "sum" gives the joint log-density of the whole sample (the policy log-prob);
            "mean" divides it by the number of elements (scale-independent of the latent size).

    Returns:
        log_probs of shape (B,), in float32 or wider.
    """
    if x.shape != mean.shape:
        raise ValueError(f"x and mean must have the same shape, got {tuple(x.shape)} and {tuple(mean.shape)}")
    dtype = _compute_dtype(x.dtype)
    x = x.to(dtype)
    mean = mean.to(dtype)
    std = expand_per_sample(std, x).to(dtype)
    _check_std_broadcasts(std, x)
    log_density = -((x - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return reduce_non_batch(log_density, reduce)


def gaussian_kl_same_std(mean_p: Tensor, mean_q: Tensor, std: Tensor | float, reduce: str = "sum") -> Tensor:
    """Closed-form KL between two diagonal Gaussians that share their standard deviation, per sample.

        KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) = ||mean_p - mean_q||^2 / (2 std^2)

    This is DPOK's per-step KL between the fine-tuned and the pre-trained policy: both use the
    same DDIM/DDPM variance, so only the means differ.

    Args:
        mean_p: means of p, shape (B, ...).
        mean_q: means of q, same shape.
        std: shared standard deviation: scalar, (B,) or broadcastable such as (B, 1, 1, 1). Must be > 0.
        reduce: "sum" over the non-batch dims (the KL of the joint) or "mean" (per element).

    Returns:
        kl of shape (B,).
    """
    if mean_p.shape != mean_q.shape:
        raise ValueError(
            f"mean_p and mean_q must have the same shape, got {tuple(mean_p.shape)} and {tuple(mean_q.shape)}"
        )
    dtype = _compute_dtype(mean_p.dtype)
    mean_p = mean_p.to(dtype)
    mean_q = mean_q.to(dtype)
    std = expand_per_sample(std, mean_p).to(dtype)
    _check_std_broadcasts(std, mean_p)
    kl = (mean_p - mean_q) ** 2 / (2.0 * std**2)
    return reduce_non_batch(kl, reduce)
