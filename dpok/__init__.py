"""dpok: reinforcement-learning fine-tuning of text-to-image diffusion models (DPOK, DDPO, ...).

From Python: ``dpok.train(dpok.TrainConfig(...), reward=fn)`` (see :mod:`dpok.api`). The names
below load on first use, so that ``import dpok`` stays light.
"""

from __future__ import annotations

from typing import Any

from ._version import __version__

__all__ = ["TrainConfig", "train", "RunResult", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name == "train":
        from .api import train

        return train
    if name == "RunResult":
        from .trainer import RunResult

        return RunResult
    raise AttributeError(f"module 'dpok' has no attribute {name!r}")
