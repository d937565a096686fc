"""The per-step KL between the policy and the pretrained model at the same x_t."""

from __future__ import annotations

import torch

from dpok.core.ddim import StepDistribution
from dpok.core.gaussian import gaussian_kl_same_std


def step_kl(kl_form: str, dist: StepDistribution, ref_dist: StepDistribution, model_output: torch.Tensor,
            ref_output: torch.Tensor, reduce: str) -> torch.Tensor:
    """Per-transition KL_t (N,) of N transitions.

    ``closed-form``: KL(N(mu, s^2) || N(mu_ref, s^2)) of the two step distributions (means
    (N, C, h, w), same std), reduced over latent elements by ``reduce`` (``sum`` or ``mean``).
    Otherwise the official code's eps form: the mean squared difference of the model outputs
    (N, C, h, w), whatever ``reduce``.
    """
    if kl_form == "closed-form":
        return gaussian_kl_same_std(dist.mean, ref_dist.mean, dist.std, reduce=reduce)
    return (model_output.float() - ref_output.float()).pow(2).flatten(1).mean(1)
