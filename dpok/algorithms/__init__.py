"""RL and baseline fine-tuning algorithms, registered by name."""

from . import ddpo, dpok, grpo, nft, rejection, supervised  # noqa: F401 - registration
from .base import ALGORITHMS, Algorithm, AlgorithmContext, Rollout

__all__ = ["ALGORITHMS", "Algorithm", "AlgorithmContext", "Rollout"]
