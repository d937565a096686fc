"""DiffusionNFT (Zheng et al., ICLR 2026): online RL on the forward process, no likelihoods.

Per round: the *sampling policy* theta_old draws clean images with any sampler (``--rollout-steps``,
``--rollout-eta``: deterministic DDIM and few steps included), the reward scores them, each reward
becomes an optimality probability r in [0, 1] (the group-standardised advantage, clipped to
+-``adv_clip`` and mapped linearly, :func:`dpok.core.nft_optimality`); then ``gradient_steps``
optimizer steps on minibatches of this round's images, each freshly noised at a uniform timestep
(or, with ``--nft-train-steps K``, at K of the rollout sampler's timesteps, as the authors' code),
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
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from ..core import PerPromptStatTracker, flow_x0_prediction, nft_loss, nft_optimality, old_policy_decay, predict_x0_and_eps
from ..options import option
from .base import ALGORITHMS, AlgorithmContext, Rollout, UpdateResult, positive, trajectory_advantages
from .supervised import RWR


@dataclass
class NFTSettings:
    """DiffusionNFT's own settings: its implicit policies, the sampling policy's decay and its sampler."""

    title: ClassVar[str] = "DiffusionNFT (--algorithm diffusion-nft)"

    nft_beta: float = option(1.0, "DiffusionNFT beta: strength of the implicit positive/negative policies "
                                  "beta v_theta + (1 - beta) v_old and (1 + beta) v_old - beta v_theta")
    nft_decay_rate: float = option(0.001, "DiffusionNFT: the sampling policy theta_old <- d theta_old + (1 - d) "
                                          "theta after each round, d = min(rate x optimizer steps so far, "
                                          "--nft-decay-max)")
    nft_decay_max: float = option(0.5, "DiffusionNFT: the largest decay d of the sampling policy")
    rollout_steps: int = option(0, "DiffusionNFT: denoising steps of the rollout sampler (0: --num-steps, which the "
                                   "evaluations use)")
    rollout_eta: float = option(-1.0, "DiffusionNFT: eta of the rollout sampler, 0 for deterministic DDIM (-1: "
                                      "--eta)")
    rollout_solver: Literal["ddim", "dpm-solver++"] = option(
        "ddim", "DiffusionNFT: the rollout sampler's solver: 'ddim' (DDIM, or a flow model's Euler/SDE step, with "
                "--rollout-eta) or 'dpm-solver++' (DPM-Solver++(2M), deterministic: needs --rollout-eta 0; the "
                "authors' 'dpm2')")
    nft_train_steps: int = option(0, "DiffusionNFT: 0 trains each minibatch once, at a uniform random timestep per "
                                     "sample (the pretraining objective's); K > 0 at K of the rollout sampler's own "
                                     "timesteps (a random order per sample, fresh noise each, the K backward passes "
                                     "accumulated into the step; at most the sampler's steps), as the authors' code")

    def validate(self) -> list[str]:
        errors = positive(self, ("nft_beta",), strict=True) + positive(self, ("rollout_steps", "nft_train_steps"))
        if not (self.nft_decay_rate >= 0 and 0 <= self.nft_decay_max < 1):
            errors.append(f"--nft-decay-rate must be >= 0 and --nft-decay-max in [0, 1) (got {self.nft_decay_rate}, "
                          f"{self.nft_decay_max})")
        if not (self.rollout_eta == -1.0 or self.rollout_eta >= 0):
            errors.append(f"--rollout-eta must be >= 0, or -1 for --eta (got {self.rollout_eta})")
        return errors


@ALGORITHMS.register
class DiffusionNFT(RWR):
    name = "diffusion-nft"
    takes_shared_noise = True
    own_rollout_sampler = True

    def __init__(self, ctx: AlgorithmContext) -> None:
        super().__init__(ctx)
        self.old = [p.detach().clone() for p in self.adapter.trainable_parameters()]
        self.optimizer_steps = 0
        pg = self.cfg.policy_gradient
        self.tracker = PerPromptStatTracker(pg.stat_buffer, pg.stat_min_count, pg.adv_std_floor)
        self._r: torch.Tensor | None = None
        self._grid: torch.Tensor | None = None  # (T,) the rollout sampler's timesteps, high to low

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

    @classmethod
    def check(cls, cfg: Any, num_processes: int) -> list[str]:
        errors = super().check(cfg, num_processes)
        eta = cfg.eta if cfg.nft.rollout_eta < 0 else cfg.nft.rollout_eta
        if cfg.nft.rollout_solver != "ddim" and eta != 0:
            errors.append(f"--rollout-solver {cfg.nft.rollout_solver} solves the deterministic ODE: give --rollout-eta 0 "
                          f"(the rollout eta is now {eta})")
        return errors

    def rollout_sampler(self) -> tuple[int, float]:
        cfg, own = self.cfg, self.cfg.nft
        return own.rollout_steps or cfg.num_steps, cfg.eta if own.rollout_eta < 0 else own.rollout_eta

    def rollout_solver(self) -> str:
        return self.cfg.nft.rollout_solver

    def update(self, rollout: Rollout) -> UpdateResult:
        cfg, pg = self.cfg, self.cfg.policy_gradient
        advantages = trajectory_advantages(pg.advantage, self.tracker, rollout.prompts, rollout.rewards,
                                           rollout.valid, pg.adv_clip, pg.adv_std_floor, rollout.advantage_groups,
                                           pg.adv_global_std)
        self._r = nft_optimality(advantages, pg.adv_clip)[rollout.valid]
        self._grid = rollout.trajectory.timesteps.detach().cpu()
        result = super().update(rollout)
        if result.skipped_updates:  # nothing was trained: the sampling policy stays where it is
            return result
        self.optimizer_steps += cfg.gradient_steps
        decay = old_policy_decay(self.optimizer_steps, cfg.nft.nft_decay_rate, cfg.nft.nft_decay_max)
        with torch.no_grad():
            for old, p in zip(self.old, self.adapter.trainable_parameters()):
                old.mul_(decay).add_(p.detach(), alpha=1.0 - decay)
        result.stats["old_policy_decay"] = decay
        result.stats["optimality_mean"] = float(self._r.mean()) if len(self._r) else float("nan")
        return result

    def _training_times(self, batch: int, gen: torch.Generator) -> list[torch.Tensor | None]:
        """``nft_train_steps`` = K > 0: K passes, pass j at the sampler's timestep perm_b[j] for sample b,
        perm_b a random order of the sampler's T timesteps (each sample meets K distinct ones)."""
        k = min(self.cfg.nft.nft_train_steps, len(self._grid)) if self._grid is not None else 0
        if k == 0:
            return [None]
        order = torch.stack([torch.randperm(len(self._grid), generator=gen) for _ in range(batch)])  # (B, T)
        return [self._grid[order[:, j]] for j in range(k)]

    def _sample_weights(self, rewards: torch.Tensor) -> torch.Tensor:
        # r of this process's valid samples, in the order they were stored (group statistics over
        # every process's rewards were taken in update)
        return self._r if self._r is not None else torch.full_like(rewards, 0.5)

    def _step_loss(self, x0, noise, latents, timesteps, embeds, weights):  # noqa: ANN001, ANN202
        a = self.adapter
        # theta_old first: swapping weights after the trained forward pass would invalidate its graph
        with torch.no_grad(), self.old_policy():
            old_pred = self._prediction(latents, timesteps, embeds).float()
        pred = self._prediction(latents, timesteps, embeds).float()
        if a.is_flow:  # the paper's own frame: x0 = x_t - t v
            t = timesteps.float() / a.num_train_timesteps
            x0_theta, x0_old = flow_x0_prediction(latents.float(), t, pred), flow_x0_prediction(latents.float(), t, old_pred)
        else:
            abar = a.alphas_cumprod[timesteps].view(-1, 1, 1, 1).float()
            x0_theta, _ = predict_x0_and_eps(pred, latents.float(), abar, a.prediction_type)
            x0_old, _ = predict_x0_and_eps(old_pred, latents.float(), abar, a.prediction_type)
        pg = self.cfg.policy_gradient
        loss, stats = nft_loss(x0_theta, x0_old, x0.float(), weights, self.cfg.nft.nft_beta, scale=pg.adv_clip)
        if pg.beta > 0:  # the eps-form KL to the pretrained model, as the authors' code
            with torch.no_grad():
                ref = self._prediction(latents, timesteps, embeds, reference=True).float()
            kl = (pred - ref).pow(2).flatten(1).mean(1).mean()
            loss = loss + pg.beta * kl
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
