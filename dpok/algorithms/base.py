"""What every algorithm shares: the rollout record, the registry, the guarded optimizer step."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ..adapter import DiffusionAdapter
from ..config import TrainConfig
from ..core import PerPromptStatTracker, clip_advantages, group_advantages
from ..distributed import gather_batch, sync_gradients
from ..sampling import Trajectory, sample_in_batches


@dataclass
class Rollout:
    """One round's samples and their rewards.

    ``rewards`` (B,) are the reward's scores with non-finite ones stored as 0; ``valid`` (B,) is
    False for those, and every algorithm leaves invalid samples out of its update.
    """

    trajectory: Trajectory
    rewards: torch.Tensor
    valid: torch.Tensor

    @property
    def prompts(self) -> list[str]:
        return self.trajectory.prompts


@dataclass
class AlgorithmContext:
    """What an algorithm may use: settings, model, optimizer and its random generators."""

    cfg: TrainConfig
    adapter: DiffusionAdapter
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator
    generator: torch.Generator
    reward: Callable[..., Any] | None = None


class Algorithm:
    """Base class. Subclasses set ``name`` and implement :meth:`update`."""

    name: ClassVar[str] = ""
    trains: ClassVar[bool] = True
    samples_from_reference: ClassVar[bool] = False  # SFT-KL learns from the pretrained model's samples

    def __init__(self, ctx: AlgorithmContext) -> None:
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.adapter = ctx.adapter

    def update(self, rollout: Rollout) -> dict[str, float]:
        raise NotImplementedError

    def sampling_policy(self) -> contextlib.AbstractContextManager[None]:
        """The weights the round's samples are drawn with (default: the trained ones)."""
        return contextlib.nullcontext()

    def rollout_sampler(self) -> tuple[int, float]:
        """(steps, eta) of the round's sampler: the training sampler, whose steps are trained on."""
        return self.cfg.num_steps, self.cfg.eta

    def generate(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Images (B, 3, H, W) the method produces for ``prompts`` (evaluation and grids)."""
        cfg = self.cfg
        traj = sample_in_batches(self.adapter, prompts, cfg.sample_batch_size, cfg.num_steps, cfg.eta,
                                 cfg.guidance_scale, generator)
        return traj.images

    def reward_queries_per_image(self) -> int:
        return 1

    def replicated_parameters(self) -> list[torch.nn.Parameter]:
        """Trained parameters of the algorithm's own (besides the policy's), e.g. DPOK's value
        function: in a multi-process run they start from the main process's values and their
        gradients are averaged like the policy's, so every process keeps the same copy."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class AlgorithmRegistry:
    """Algorithms by name; the trainer never branches on a name."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Algorithm]] = {}

    def register(self, cls: type[Algorithm]) -> type[Algorithm]:
        self._classes[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def create(self, name: str, ctx: AlgorithmContext) -> Algorithm:
        if name not in self._classes:
            raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(self.names())}")
        return self._classes[name](ctx)


ALGORITHMS = AlgorithmRegistry()


def guarded_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float,
                 scale: float = 1.0) -> dict[str, float]:
    """Clip and apply the accumulated gradients, unless they are not finite.

    A non-finite gradient norm skips the step and clears the gradients, leaving the weights
    bitwise unchanged (``skipped`` = 1). ``grad_norm`` is the norm before clipping.

    In a multi-process run the gradients are first averaged over processes (every process calls
    this the same number of times); the norm, and so the skip decision, is then the same on all.
    """
    params = list(params)
    sync_gradients(params)
    if scale != 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "skipped_steps": 1.0}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": norm, "skipped_steps": 0.0}


def trajectory_advantages(estimator: str, tracker: PerPromptStatTracker, prompts: list[str], rewards: torch.Tensor,
                          valid: torch.Tensor, clip: float) -> torch.Tensor:
    """One advantage per trajectory (B,) for ``estimator`` 'group' or 'tracker', clipped to +-``clip``;
    zeros for 'value' (computed per transition by DPOK's value function instead).

    The statistics see every process's rewards (one process: this batch), so every process keeps
    the same tracker state and a group split over processes is still one group. Invalid samples
    get 0 and enter no statistic.
    """
    if estimator == "value":
        return torch.zeros_like(rewards, dtype=torch.float32)
    masked = torch.where(valid, rewards, torch.full_like(rewards, float("nan")))
    all_prompts, all_rewards, mine = gather_batch(prompts, masked)
    if estimator == "group":
        advantages = group_advantages(all_prompts, all_rewards)
    else:
        advantages = tracker.update(all_prompts, all_rewards)
    return clip_advantages(advantages, clip)[mine]


def mean_stats(items: list[dict[str, float]]) -> dict[str, float]:
    """Average each key over a list of stats dicts (sums for counters named ``skipped_*``)."""
    out: dict[str, float] = {}
    for key in {k for d in items for k in d}:
        values = [d[key] for d in items if key in d]
        out[key] = float(np.sum(values)) if key.startswith("skipped") else float(np.mean(values))
    return out
