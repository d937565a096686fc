"""GRPO for diffusion models (Flow-GRPO, Liu et al. 2025; DanceGRPO, Xue et al. 2025).

k samples per prompt per round; each reward standardised within its prompt's group of the round
(``--advantage group``, no value function); every sample's steps (a window of them, or a random
``timestep_fraction`` of the window per sample, as Flow-GRPO-Fast trains only some steps) trained
on-policy in minibatches with PPO's clipped surrogate plus beta times the closed-form per-step KL to
the reference policy (the same network with the LoRA disabled):

    loss = mean_n [ max(-A_n rho_n, -A_n clamp(rho_n, 1 - eps, 1 + eps)) + beta KL_n ]

The update loop (minibatches, inner epochs, gradient accumulation, several processes) is DDPO-IS's;
with beta = 0 GRPO is DDPO-IS with group advantages.
"""

from __future__ import annotations

import torch

from ..core import grpo_loss, step_kl
from ..sampling import policy_step
from .base import ALGORITHMS
from .ddpo import DDPOIS, StepContext


def step_kl_to_reference(adapter, step: StepContext, cfg) -> torch.Tensor:  # noqa: ANN001
    """KL_t (N,) between the policy's step and the reference's at the same x_t (closed form on the
    means, or the official DPOK code's eps form, as ``--kl-form`` says), reduced like the log-probs."""
    with torch.no_grad():
        ref_dist, ref_output = policy_step(adapter, step.latents, step.timesteps, step.embeds, cfg.guidance_scale,
                                           cfg.eta, cfg.num_steps, reference=True)
    return step_kl(cfg.policy_gradient.kl_form, step.dist, ref_dist, step.output, ref_output, cfg.logprob_reduce)


@ALGORITHMS.register
class GRPO(DDPOIS):
    name = "grpo"
    advantages = ("group",)  # rewards standardised within each prompt's group: the method itself

    def loss(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
             step: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, pg = self.cfg, self.cfg.policy_gradient
        if pg.beta == 0:  # no reference forward pass when nothing weighs the KL
            kl = torch.zeros_like(log_probs)
        else:
            kl = step_kl_to_reference(self.adapter, step, cfg)
        return grpo_loss(log_probs, old_log_probs, advantages, kl, pg.beta, pg.clip_range)
