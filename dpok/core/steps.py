"""Which denoising steps of a trajectory are trained on.

A trajectory of T steps is indexed i = 0 .. T-1 from the noisiest step (x_T -> x_{T-1}) to the
last (x_1 -> x_0). Early steps decide the layout (how many objects, where, which colour); the last
low-noise steps only sharpen edges, yet with a small sigma_t they dominate the log-prob gradient
and the closed-form KL (the KL term scales as 1 / sigma_t^2). A window of steps keeps training on
the steps that can change what the reward measures.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def step_window(num_steps: int, start: float = 0.0, end: float = 1.0) -> Tensor:
    """Indices (K,) long of the steps in the window [start, end) of a T-step trajectory.

    The window is given as fractions of the trajectory: step i is in it when
    floor(start T) <= i < ceil(end T); (0, 1) is every step, (0, 0.75) leaves out the final
    quarter. At least one step is always kept.

    Args:
        num_steps: T >= 1.
        start, end: 0 <= start < end <= 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0.0 <= start < end <= 1.0:
        raise ValueError(f"the step window must satisfy 0 <= start < end <= 1, got ({start}, {end})")
    first = min(math.floor(start * num_steps), num_steps - 1)
    last = max(math.ceil(end * num_steps - 1e-9), first + 1)
    return torch.arange(first, min(last, num_steps))
