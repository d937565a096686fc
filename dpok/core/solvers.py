"""Deterministic few-step solvers of the probability-flow ODE, for rollouts that need only x_0.

Both model families write the noisy point as x_t = alpha_t x_0 + sigma_t eps: a DDPM-family model
with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t); a rectified-flow model with alpha_t = 1 - t,
sigma_t = t. The solvers below take the network's x_0 prediction D(x_t) in that frame, so one
function serves both (the caller converts eps, v or velocity outputs into D).
"""

from __future__ import annotations

import math

from torch import Tensor


def half_log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma): -inf at pure noise (alpha = 0), +inf at the data (sigma = 0)."""
    if alpha <= 0:
        return -math.inf
    if sigma <= 0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def dpm_solver_pp_step(x_s: Tensor, d_s: Tensor, s: tuple[float, float], t: tuple[float, float],
                       d_prev: Tensor | None = None, prev: tuple[float, float] | None = None) -> Tensor:
    """One step of DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2), data-prediction form,
    from time s to the less noisy time t, each given as (alpha, sigma).

    First order (DDIM with eta 0; Euler for a rectified flow):

        x_t = (sigma_t / sigma_s) x_s + (alpha_t - alpha_s sigma_t / sigma_s) D,   D = d_s

    which equals sigma_t / sigma_s x_s - alpha_t (e^{-h} - 1) D with h = lambda_t - lambda_s and
    stays finite at alpha_s = 0 (a flow model's t = 1). Second order, when the previous step's
    prediction ``d_prev`` at time ``prev`` is given and every lambda is finite:

        D = (1 + 1 / (2 r)) d_s - 1 / (2 r) d_prev,   r = (lambda_s - lambda_prev) / h

    (the multistep correction of diffusers' DPMSolverMultistepScheduler, solver_type "midpoint").
    Without ``d_prev`` (the first step) the step is of first order; so it is where a lambda is
    infinite: the step to sigma_t = 0 (the solver's lower_order_final) and, on a flow model, the
    second step, whose previous point is pure noise (alpha = 0).

    Args:
        x_s: (B, ...) the state at time s.
        d_s: (B, ...) the x_0 prediction at (x_s, s).
        s, t: (alpha, sigma) of the two times, sigma_t < sigma_s.
        d_prev: (B, ...) the x_0 prediction of the step before, at time ``prev``, or None.

    Returns:
        x_t (B, ...) in the dtype of ``x_s``.
    """
    (alpha_s, sigma_s), (alpha_t, sigma_t) = s, t
    if not 0 <= sigma_t < sigma_s:
        raise ValueError(f"a step must go to a less noisy time: sigma_s {sigma_s}, sigma_t {sigma_t}")
    d = d_s.double()
    lam_s, lam_t = half_log_snr(alpha_s, sigma_s), half_log_snr(alpha_t, sigma_t)
    if d_prev is not None and prev is not None:
        lam_prev = half_log_snr(*prev)
        if all(math.isfinite(v) for v in (lam_prev, lam_s, lam_t)):
            r = (lam_s - lam_prev) / (lam_t - lam_s)
            d = (1.0 + 0.5 / r) * d - (0.5 / r) * d_prev.double()
    x_t = (sigma_t / sigma_s) * x_s.double() + (alpha_t - alpha_s * sigma_t / sigma_s) * d
    return x_t.to(x_s.dtype)
