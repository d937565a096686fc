"""DiffusionNFT (Zheng et al., ICLR 2026): online RL on the forward process, no likelihoods.

Per round: the *sampling policy* theta_old draws clean images with any sampler (``--rollout-steps``,
``--rollout-eta``: deterministic DDIM and few steps included), the reward scores them, each reward
becomes an optimality probability r in [0, 1] (the group-standardised advantage, clipped to
+-``adv_clip`` and mapped linearly, :func:`dpok.core.nft_optimality`); then ``gradient_steps``
optimizer steps on minibatches of this round's images, each freshly noised at a uniform timestep,
on the loss of :func:`dpok.core.nft_loss` between the trained network's and theta_old's x_0
predictions (guided or conditional, ``--supervised-target``; the paper's is the conditional one,
CFG-free). After the round theta_old <- d theta_old + (1 - d) theta with
d = min(``nft_decay_rate`` x optimizer steps so far, ``nft_decay_max``) (the authors' schedule:
on-policy at first, then a slower-moving sampler). With ``beta`` > 0 the eps-form KL
beta mean((out_theta - out_pre)^2) to the pretrained model is added, as in the authors' code.

theta_old is kept as a copy of the trainable tensors (a LoRA's are small) and swapped into the
network to sample or to predict; the reference (pretrained) policy is the network with LoRA off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..core import PerPromptStatTracker, nft_loss, nft_optimality, old_policy_decay, predict_x0_and_eps
from .base import ALGORITHMS, AlgorithmContext, Rollout, trajectory_advantages
from .supervised import RWR


@ALGORITHMS.register
class DiffusionNFT(RWR):
    name = "diffusion-nft"

    def __init__(self, ctx: AlgorithmContext) -> None:
        super().__init__(ctx)
        self.old = [p.detach().clone() for p in self.adapter.trainable_parameters()]
        self.optimizer_steps = 0
        self.tracker = PerPromptStatTracker(self.cfg.stat_buffer, self.cfg.stat_min_count)
        self._r: torch.Tensor | None = None

    @contextlib.contextmanager
    def old_policy(self) -> Iterator[None]:
        """Within this block the network holds theta_old (the trained weights are put back after)."""
        params = self.adapter.trainable_parameters()
        with torch.no_grad():
            current = [p.detach().clone() for p in params]
            for p, old in zip(params, self.old):
                p.copy_(old)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(params, current):
                    p.copy_(c)

    def replicated_parameters(self) -> list[torch.Tensor]:
        # theta_old is the same on every process: broadcast at the start and in the weights digest
        return list(self.old)

    def sampling_policy(self) -> contextlib.AbstractContextManager[None]:
        return self.old_policy()

    def rollout_sampler(self) -> tuple[int, float]:
        cfg = self.cfg
        return cfg.rollout_steps or cfg.num_steps, cfg.eta if cfg.rollout_eta < 0 else cfg.rollout_eta

    def update(self, rollout: Rollout) -> dict[str, float]:
        cfg = self.cfg
        advantages = trajectory_advantages(cfg.advantage, self.tracker, rollout.prompts, rollout.rewards,
                                           rollout.valid, cfg.adv_clip)
        self._r = nft_optimality(advantages, cfg.adv_clip)[rollout.valid]
        out = super().update(rollout)
        if out.get("skipped_updates"):  # nothing was trained: the sampling policy stays where it is
            return out
        self.optimizer_steps += cfg.gradient_steps
        decay = old_policy_decay(self.optimizer_steps, cfg.nft_decay_rate, cfg.nft_decay_max)
        with torch.no_grad():
            for old, p in zip(self.old, self.adapter.trainable_parameters()):
                old.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        out["old_policy_decay"] = decay
        out["optimality_mean"] = float(self._r.mean()) if len(self._r) else float("nan")
        return out

    def _sample_weights(self, rewards: torch.Tensor) -> torch.Tensor:
        # r of this process's valid samples, in the order they were stored (group statistics over
        # every process's rewards were taken in update)
        return self._r if self._r is not None else torch.full_like(rewards, 0.5)

    def _step_loss(self, x0, noise, latents, timesteps, embeds, weights):  # noqa: ANN001, ANN202
        a = self.adapter
        abar = a.alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
        # theta_old first: swapping weights after the trained forward pass would invalidate its graph
        with torch.no_grad(), self.old_policy():
            old_pred = self._prediction(latents, timesteps, embeds).float()
        pred = self._prediction(latents, timesteps, embeds).float()
        x0_theta, _ = predict_x0_and_eps(pred, latents.float(), abar, a.prediction_type)
        x0_old, _ = predict_x0_and_eps(old_pred, latents.float(), abar, a.prediction_type)
        loss, stats = nft_loss(x0_theta, x0_old, x0.float(), weights, self.cfg.nft_beta, scale=self.cfg.adv_clip)
        if self.cfg.beta > 0:  # the eps-form KL to the pretrained model, as the authors' code
            with torch.no_grad():
                ref = self._prediction(latents, timesteps, embeds, reference=True).float()
            kl = (pred - ref).pow(2).flatten(1).mean(1).mean()
            loss = loss + self.cfg.beta * kl
            stats["kl"] = kl.item()
        return loss, stats

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({f"old_{i}": t for i, t in enumerate(self.old)})
        state["optimizer_steps"] = self.optimizer_steps
        state["stat_tracker"] = self.tracker.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.optimizer_steps = int(state.pop("optimizer_steps", 0))
        self.tracker.load_state_dict(state.pop("stat_tracker"))
        for i, t in enumerate(self.old):
            t.copy_(state.pop(f"old_{i}"))
        super().load_state_dict(state)
