"""Reward normalisation into advantages (DDPO's per-prompt statistics, group statistics, clipping).

Standard deviations are population standard deviations (``ddof = 0``, as ``numpy.std`` in DDPO's
reference code). Non-finite rewards (NaN/inf from a failed reward model call) never enter any
statistic and receive advantage 0, so they contribute no gradient; only the advantages are
returned, callers that need the mask can recompute it as ``torch.isfinite(rewards)``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

DEFAULT_EPS = 1e-6


def _mean_std(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population std of a non-empty 1-D tensor."""
    return values.mean(), values.std(unbiased=False)


def _check_rewards(rewards: Tensor) -> None:
    if rewards.ndim != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")


def _scale(std: Tensor, std_floor: float) -> Tensor:
    """The divisor of a standardised advantage: max(std, floor) + eps."""
    return std.clamp_min(std_floor) + DEFAULT_EPS


def group_advantages(prompts: list[str], rewards: Tensor, eps: float = DEFAULT_EPS, std_floor: float = 0.0,
                     global_std: bool = False) -> Tensor:
    """Group-relative advantages (GRPO): standardise each reward within its prompt's group of this round.

        A_i = (r_i - mean_{g(i)}) / (max(std_{g(i)}, floor) + eps)

    where g(i) is the set of finite rewards of this batch with the same prompt as sample i, and
    mean / std are its mean and population std. No history is kept, so the baseline is the current
    policy's own reward for that prompt. A group of one sample (or of equal rewards) gives A = 0:
    it carries no information about which of its samples was better. Non-finite rewards get A = 0.

    Or, with ``global_std``, A_i = (r_i - mean_{g(i)}) / (max(std_all, floor) + eps) with std_all the
    population std of every finite reward of the batch (``sample.global_std`` of the Flow-GRPO and
    DiffusionNFT code, on in both codes' configs): a group whose rewards barely differ keeps
    small advantages instead of unit-scale ones, and groups with a larger spread weigh more.

    The floor keeps a group whose rewards barely differ (all near 0 on a prompt the model cannot
    draw yet) from having its reward model's noise blown up to unit-scale advantages: a spread
    below the floor gives advantages below 1 in size (floor 0: plain standardisation).

    Args:
        prompts: B prompt strings, ``prompts[i]`` produced ``rewards[i]``.
        rewards: (B,).
        eps: added to each group's std.
        std_floor: >= 0, the smallest std a group is divided by (in reward units).
        global_std: divide by the std of the whole batch instead of each group's.

    Returns:
        advantages (B,) with the dtype and device of ``rewards``.
    """
    _check_rewards(rewards)
    if len(prompts) != rewards.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {rewards.shape[0]} rewards")
    values, finite = _finite_values(rewards)
    advantages = torch.zeros_like(values)
    every = _mean_std(values[finite])[1] if global_std and int(finite.sum()) >= 2 else None
    for rows, mean, std in _prompt_statistics(prompts, values, finite):
        scale = std if every is None else every
        advantages[rows] = (values[rows] - mean) / (scale.clamp_min(std_floor) + eps)
    return advantages.to(dtype=rewards.dtype, device=rewards.device)


def _finite_values(rewards: Tensor) -> tuple[Tensor, Tensor]:
    """The rewards as float64 on the CPU (B,), and which of them are finite (B,) bool."""
    values = rewards.detach().double().cpu()
    return values, torch.isfinite(values)


def _prompt_statistics(prompts: list[str], values: Tensor, finite: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(rows (B,) bool, mean, population std) of the finite rewards of each prompt that has two or more."""
    for prompt in dict.fromkeys(prompts):
        rows = torch.tensor([p == prompt for p in prompts]) & finite
        if int(rows.sum()) >= 2:
            yield rows, *_mean_std(values[rows])


def trunk_advantages(prompts: list[str], groups: list[str], rewards: Tensor, eps: float = DEFAULT_EPS,
                     std_floor: float = 0.0) -> Tensor:
    """The advantage of a shared trunk: the mean reward of each sample's group, standardised over its prompt.

        A_trunk,i = (mean_{G(i)} - mean_{P(i)}) / (max(std_{P(i)}, floor) + eps)

    where G(i) is sample i's group (the k trajectories that branched from one trunk) and P(i) every
    sample of its prompt this round, finite rewards only, population std. The steps a group shares
    were taken once for all k of its trajectories, so they are credited with what the group as a
    whole scored against the prompt's other groups; each trajectory's own steps after the branch
    point get its reward against its own group (:func:`group_advantages` on the groups). A group or
    prompt without two finite rewards gives 0, as does a non-finite reward.

    Args:
        prompts: B prompt strings; groups: B group keys (a group holds one prompt); rewards: (B,).

    Returns:
        advantages (B,) with the dtype and device of ``rewards``.
    """
    _check_rewards(rewards)
    if not len(prompts) == len(groups) == rewards.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts and {len(groups)} groups for {rewards.shape[0]} rewards")
    values, finite = _finite_values(rewards)
    advantages = torch.zeros_like(values)
    for rows, mean, std in _prompt_statistics(prompts, values, finite):
        for group in dict.fromkeys(g for g, r in zip(groups, rows.tolist()) if r):
            members = torch.tensor([g == group for g in groups]) & finite
            advantages[members] = (values[members].mean() - mean) / (std.clamp_min(std_floor) + eps)
    return advantages.to(dtype=rewards.dtype, device=rewards.device)


def clip_advantages(advantages: Tensor, limit: float) -> Tensor:
    """Clamp advantages to [-limit, limit] (DDPO's ``adv_clip_max``); same shape as the input."""
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    return advantages.clamp(-limit, limit)


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation.

    For each prompt a FIFO buffer keeps its last ``buffer_size`` finite rewards. A prompt whose
    history holds fewer than ``min_count`` rewards (after adding the current ones) is normalised
    with the statistics of the whole current batch instead, because a handful of samples give a
    useless std:

        A_i = (r_i - mean_p) / (max(std_p, floor) + 1e-6)

    where (mean_p, std_p) are the statistics of the prompt's last max(buffer_size, n_p) rewards,
    n_p being the prompt's count in this batch, or of the finite rewards of the current batch
    while the history is too small. Every current reward of the prompt is in its own statistics:
    with a buffer shorter than the batch (DDPO's deque would keep only the batch's tail) the
    advantages of one batch would otherwise be standardised by the statistics of its last part
    alone and no longer have mean 0. Non-finite rewards are not stored and get A = 0. ``std_floor``
    as in :func:`group_advantages` (0: none).
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16, std_floor: float = 0.0) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not 0 <= min_count <= buffer_size:
            # A min_count above buffer_size could never be reached: per-prompt statistics would silently never be used.
            raise ValueError(f"min_count must lie in [0, buffer_size={buffer_size}], got {min_count}")
        if std_floor < 0:
            raise ValueError(f"std_floor must be >= 0, got {std_floor}")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.std_floor = std_floor
        self._buffers: dict[str, deque[float]] = {}

    def update(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """Store the finite rewards and return the advantages.

        Args:
            prompts: B prompt strings, ``prompts[i]`` produced ``rewards[i]``.
            rewards: (B,).

        Returns:
            advantages (B,) with the dtype and device of ``rewards``; 0 where the reward is not finite.
        """
        _check_rewards(rewards)
        if len(prompts) != rewards.shape[0]:
            raise ValueError(f"got {len(prompts)} prompts for {rewards.shape[0]} rewards")
        values = rewards.detach().double().cpu()
        finite = torch.isfinite(values)
        batch_stats = _mean_std(values[finite]) if bool(finite.any()) else None
        advantages = torch.zeros_like(values)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts]) & finite
            if not bool(rows.any()):
                continue
            buffer = self._buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            current = values[rows].tolist()
            history = (list(buffer) + current)[-max(self.buffer_size, len(current)):]
            buffer.extend(current)
            if len(history) >= self.min_count:
                mean, std = _mean_std(torch.tensor(history, dtype=torch.float64))
            else:
                mean, std = batch_stats
            advantages[rows] = (values[rows] - mean) / _scale(std, self.std_floor)
        return advantages.to(dtype=rewards.dtype, device=rewards.device)

    def stats(self) -> dict[str, int]:
        """Counts: number of prompts seen, stored rewards, smallest/largest buffer, prompts past ``min_count``."""
        counts = [len(buffer) for buffer in self._buffers.values()]
        return {
            "num_prompts": len(counts),
            "num_rewards": sum(counts),
            "min_prompt_count": min(counts, default=0),
            "max_prompt_count": max(counts, default=0),
            "num_prompts_ready": sum(count >= self.min_count for count in counts),
        }

    def clear(self) -> None:
        """Forget every stored reward."""
        self._buffers.clear()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the configuration and every prompt's buffer as a list of floats (oldest first)."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {prompt: list(buffer) for prompt, buffer in self._buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state written by :meth:`state_dict` (buffers, ``buffer_size`` and ``min_count``;
        ``std_floor`` stays this tracker's), replacing the current one."""
        missing = {"buffer_size", "min_count", "buffers"} - set(state)
        if missing:
            raise ValueError(f"state dict is missing keys {sorted(missing)}")
        restored = PerPromptStatTracker(int(state["buffer_size"]), int(state["min_count"]))
        for prompt, values in state["buffers"].items():
            restored._buffers[str(prompt)] = deque((float(v) for v in values), maxlen=restored.buffer_size)
        self.buffer_size = restored.buffer_size
        self.min_count = restored.min_count
        self._buffers = restored._buffers
