"""Rejection sampling (best-of-n by reward): the no-training baseline the DPOK abstract mentions.

Nothing is trained; each output image is the highest-reward one of ``best_of`` samples of the
base model for its prompt, so it costs ``best_of`` reward queries per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..options import option
from ..sampling import sample_in_batches
from .base import ALGORITHMS, Algorithm, Rollout, UpdateResult, positive


@dataclass
class RejectionSettings:
    """Rejection sampling's one setting."""

    title: ClassVar[str] = "rejection sampling (--algorithm rejection-sampling)"

    best_of: int = option(8, "rejection sampling: candidates per image (best-of-n)")

    def validate(self) -> list[str]:
        return positive(self, ("best_of",), least=1)


@ALGORITHMS.register
class RejectionSampling(Algorithm):
    name = "rejection-sampling"
    trains = False
    families = ("diffusion", "flow-matching")  # it only samples, with either family's policy

    def update(self, rollout: Rollout) -> UpdateResult:
        return UpdateResult()

    def reward_queries_per_image(self) -> int:
        return self.cfg.rejection.best_of

    def generate(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        if self.ctx.reward is None:
            raise RuntimeError("rejection sampling needs the reward to pick the best sample")
        candidates = [p for p in prompts for _ in range(cfg.rejection.best_of)]
        traj = sample_in_batches(self.adapter, candidates, cfg.sample_batch_size, cfg.num_steps, cfg.eta,
                                 cfg.guidance_scale, generator)
        out = self.ctx.reward(traj.images, candidates)
        # an invalid (non-finite) score never wins
        scores = torch.where(out.valid, out.scores, torch.full_like(out.scores, -float("inf")))
        best = scores.view(len(prompts), cfg.rejection.best_of).argmax(1)
        images = traj.images.view(len(prompts), cfg.rejection.best_of, *traj.images.shape[1:])
        return images[torch.arange(len(prompts)), best]
