"""DDPO (Black et al. 2023): score-function (SF) and importance-sampled PPO-clip (IS) updates.

Advantages come from per-prompt reward statistics (``advantage="tracker"``, DDPO: mean and std
of the last ``stat_buffer`` rewards of that prompt; the batch's until ``stat_min_count`` exist)
or from the prompt's group of this round (``"group"``, GRPO), clipped to +-``adv_clip``.
Each update pass shuffles the samples into minibatches of ``minibatch_size`` and, per sample, a
random ``timestep_fraction`` of its steps; gradients are accumulated over those steps and
``grad_accum`` minibatches before each optimizer step. SF makes one optimizer step per round
over the whole batch (the on-policy gradient); IS makes ``inner_epochs`` passes.

With several processes each one trains on its own samples (``minibatch_size`` per process) with
gradients averaged before each step, and the per-prompt statistics see every process's rewards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .. import distributed
from ..core import PerPromptStatTracker, ddpo_is_loss, ddpo_sf_loss, step_window
from ..options import option
from ..sampling import evaluate_log_probs
from .base import (
    ALGORITHMS,
    Algorithm,
    AlgorithmContext,
    Rollout,
    UpdateResult,
    guarded_step,
    largest_divisor_at_most,
    mean_stats,
    positive,
    step_advantages,
)

if TYPE_CHECKING:
    from ..config import TrainConfig


@dataclass
class DDPOSettings:
    """DDPO's own settings, shared by GRPO: passes over a round's samples and the steps trained."""

    title: ClassVar[str] = "DDPO-IS and GRPO (--algorithm ddpo-is, grpo)"

    inner_epochs: int = option(1, "DDPO-IS and GRPO passes over each round's samples")
    timestep_fraction: float = option(0.0, "share of the window's steps trained on, drawn per sample and round "
                                           "(DDPO, GRPO; 0: auto, 0.4 for ddpo-is and grpo as docs/tuning.md chose, "
                                           "1 for ddpo-sf)")

    def validate(self) -> list[str]:
        errors = positive(self, ("inner_epochs",), least=1)
        if not 0 <= self.timestep_fraction <= 1:
            errors.append(f"--timestep-fraction must be in (0, 1], or 0 for auto (got {self.timestep_fraction})")
        return errors


@dataclass
class StepContext:
    """The evaluated steps of a minibatch: x_t (N, C, h, w), t (N,), the prompts' embeddings, the
    policy's step distribution and its guided model output (with gradients)."""

    latents: torch.Tensor
    timesteps: torch.Tensor
    embeds: Any
    dist: Any
    output: torch.Tensor


class _DDPO(Algorithm):
    importance_sampling = True
    sample_minibatches = True  # a minibatch is whole samples, each with its trained steps
    takes_shared_noise = True
    reads_ddpo_settings = True
    # the automatic update shape: samples per minibatch (at most) and the share of steps trained
    minibatch_samples: ClassVar[int] = 32
    timestep_fraction_default: ClassVar[float] = 1.0
    # log-probs of recorded steps: DDIM's Gaussian, or Flow-GRPO's SDE step on a flow model
    families = ("diffusion", "flow-matching")

    @classmethod
    def minibatch_default(cls, share: int) -> int:
        return largest_divisor_at_most(share, cls.minibatch_samples)

    @classmethod
    def auto_settings(cls, cfg: TrainConfig) -> dict[str, Any]:
        if cfg.ddpo.timestep_fraction == 0:
            return {"ddpo": {"timestep_fraction": cls.timestep_fraction_default}}
        return {}

    def __init__(self, ctx: AlgorithmContext) -> None:
        super().__init__(ctx)
        if self.cfg.ddpo.timestep_fraction == 0:
            raise ValueError("--timestep-fraction 0 (auto) is resolved by TrainConfig.resolved(); build the run with "
                             "dpok.run_parts.build_run or resolve the config first")
        pg = self.cfg.policy_gradient
        self.tracker = PerPromptStatTracker(pg.stat_buffer, pg.stat_min_count, pg.adv_std_floor)

    def update(self, rollout: Rollout) -> UpdateResult:
        cfg, pg, traj = self.cfg, self.cfg.policy_gradient, rollout.trajectory
        traj.check_reduce(cfg.logprob_reduce)
        # per-prompt statistics over the whole round, i.e. the rewards of every process
        advantages = step_advantages(pg, self.tracker, rollout)  # (B, T)
        keep = rollout.valid.nonzero().flatten()
        # each optimizer step is a collective in a multi-process run: every process makes as many
        # as the process with the most valid samples needs (one process: len(keep))
        most = distributed.all_max(len(keep))
        if most == 0:
            return UpdateResult(skipped_updates=1)
        window = step_window(traj.num_steps, pg.step_window_start, pg.step_window_end)
        n_train = max(1, round(len(window) * cfg.ddpo.timestep_fraction))
        epochs = cfg.ddpo.inner_epochs if self.importance_sampling else 1
        n_minibatches = -(-most // cfg.minibatch_size)
        accum = n_minibatches if not self.importance_sampling else cfg.grad_accum
        stats: list[dict[str, float]] = []
        for _ in range(epochs):
            order = keep[torch.randperm(len(keep), generator=self.ctx.generator)]
            minibatches = [order[i * cfg.minibatch_size : (i + 1) * cfg.minibatch_size] for i in range(n_minibatches)]
            for j, mb in enumerate(minibatches):
                if len(mb):  # empty only on a process with fewer valid samples than another
                    stats.append(self._accumulate(traj, mb, advantages, window, n_train, accum))
                if (j + 1) % accum == 0 or j + 1 == len(minibatches):
                    stats.append(guarded_step(self.ctx.optimizer, self.adapter.trainable_parameters(),
                                              cfg.max_grad_norm))
        out = mean_stats(stats)
        out["advantage_abs_mean"] = float(advantages[keep].abs().mean()) if len(keep) else 0.0
        return UpdateResult.of(out)

    def _accumulate(self, traj, mb: torch.Tensor, advantages: torch.Tensor, window: torch.Tensor,  # noqa: ANN001
                    n_train: int, accum: int) -> dict[str, float]:
        cfg, adapter = self.cfg, self.adapter
        # each sample trains on its own random subset of the window's steps (DDPO shuffles timesteps per sample)
        perms = torch.stack([window[torch.randperm(len(window), generator=self.ctx.generator)[:n_train]] for _ in mb])
        stats = []
        device = adapter.device
        embeds = traj.embeds[mb.to(traj.embeds.cond.device)].to(device)
        for k in range(n_train):
            steps = perms[:, k]
            latents = traj.latents[mb, steps].to(device)
            next_latents = traj.next_latents[mb, steps].to(device)
            timesteps = traj.timesteps.to(device)[steps.to(device)]
            log_probs, dist, output = evaluate_log_probs(adapter, latents, next_latents, timesteps, embeds,
                                                         cfg.guidance_scale, cfg.eta, cfg.num_steps, cfg.logprob_reduce)
            adv = advantages[mb, steps].to(device)
            old = traj.log_probs[mb, steps].to(device)
            loss, s = self.loss(log_probs, old, adv, StepContext(latents, timesteps, embeds, dist, output))
            (loss / (n_train * accum)).backward()
            stats.append({**s, "loss": loss.item()})
        return mean_stats(stats)

    def loss(self, log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
             step: StepContext) -> tuple[torch.Tensor, dict[str, float]]:
        """The per-transition loss of one minibatch of steps (N,): the PPO clipped surrogate (IS) or
        the score-function estimator (SF). ``step`` holds what a loss with a KL term needs."""
        if self.importance_sampling:
            return ddpo_is_loss(log_probs, old_log_probs, advantages, self.cfg.policy_gradient.clip_range)
        return ddpo_sf_loss(log_probs, advantages)

    def state_dict(self) -> dict[str, Any]:
        return {"stat_tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["stat_tracker"])


@ALGORITHMS.register
class DDPOSF(_DDPO):
    name = "ddpo-sf"
    importance_sampling = False


@ALGORITHMS.register
class DDPOIS(_DDPO):
    name = "ddpo-is"
    importance_sampling = True
    # chosen by the sweep of docs/tuning.md (benchmarks/tune.py) for DDPO-IS and GRPO on the embedded
    # model: several PPO steps per round on minibatches of 8 samples, 40 % of each sample's steps;
    # the same shape lifted the rare pair on the flow model where one whole-round step did not
    # (docs/flow_model.md)
    minibatch_samples = 8
    timestep_fraction_default = 0.4
