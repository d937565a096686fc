"""Learning-rate schedules over the rounds of a run.

The factor multiplies ``--learning-rate`` for the optimizer steps of one round. A round-indexed
schedule (not a step-indexed one) depends only on the round counter that checkpoints keep, so a
resumed run steps exactly as an uninterrupted one.
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_factor(round_index: int, rounds: int, schedule: str = "constant", warmup_rounds: int = 0) -> float:
    """Multiplier of the base learning rate in round ``round_index`` (0-based) of ``rounds``.

    - warm-up: (i + 1) / (W + 1) for the first W rounds;
    - then, with p = (i - W) / (R - W), the progress through the remaining rounds (0 at the first):
      ``constant`` 1; ``cosine`` (1 + cos(pi p)) / 2; ``linear`` 1 - p.

    The last round (p = (R - W - 1) / (R - W)) still gets a positive step.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if rounds < 1 or not 0 <= warmup_rounds < rounds:
        raise ValueError(f"need rounds >= 1 and 0 <= warmup_rounds < rounds, got {rounds} and {warmup_rounds}")
    if round_index < warmup_rounds:
        return (round_index + 1) / (warmup_rounds + 1)
    progress = min(round_index - warmup_rounds, rounds - warmup_rounds) / (rounds - warmup_rounds)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    return 1.0
