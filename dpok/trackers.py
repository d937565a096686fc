"""Experiment trackers (``--report-to tensorboard,wandb``) through accelerate's tracker integration.

The run's scalars (the ``metrics.jsonl`` rows, the ``eval/*`` evaluations) and its image grids
(samples before and after, each in-training evaluation) go to every tracker named, through
:class:`accelerate.tracking.TensorBoardTracker` (events in ``RUN/tensorboard/``) and
:class:`accelerate.tracking.WandBTracker` (``RUN/wandb/``; ``WANDB_MODE=offline`` keeps it on disk,
``WANDB_PROJECT`` names the project, default ``dpok``). The resolved settings are stored as the
run's hyperparameters. A resumed run continues the same wandb run (its id is kept in
``RUN/trackers.json``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

TRACKER_NAMES = ("tensorboard", "wandb")


def parse_report_to(values: Sequence[str]) -> list[str]:
    """The tracker names of ``--report-to`` (repeatable, or comma-separated); ``none`` is no tracker.

    Raises ValueError naming an unknown tracker, ``none`` mixed with others, or wandb not installed.
    """
    names = list(dict.fromkeys(n.strip() for v in values for n in v.split(",") if n.strip()))
    if "none" in names:
        if len(names) > 1:
            raise ValueError(f"--report-to none cannot be combined with {', '.join(n for n in names if n != 'none')}")
        return []
    unknown = [n for n in names if n not in TRACKER_NAMES]
    if unknown:
        raise ValueError(f"--report-to {', '.join(unknown)} is unknown; valid: {', '.join(TRACKER_NAMES)} or none")
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise ValueError("--report-to wandb needs the wandb package: pip install 'dpok[wandb]' (or pip install wandb)")
    return names


def _hparams(config: dict[str, Any]) -> dict[str, Any]:
    """Settings as tracker hyperparameters: lists joined into one string (TensorBoard takes scalars only)."""
    return {k: ", ".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in config.items()}


class Trackers:
    """The trackers of one run folder (main process only), each one of accelerate's tracker classes."""

    def __init__(self, names: Sequence[str], run_dir: str | Path, config: dict[str, Any] | None = None) -> None:
        from accelerate.tracking import TensorBoardTracker, WandBTracker

        self.run_dir = Path(run_dir)
        self.names = parse_report_to(names)
        self.trackers: list[Any] = []
        state_file = self.run_dir / "trackers.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        for name in self.names:
            if name == "tensorboard":
                tracker = TensorBoardTracker("tensorboard", self.run_dir)
            else:
                run_id = state.setdefault("wandb_id", secrets.token_hex(4))
                tracker = WandBTracker(os.environ.get("WANDB_PROJECT", "dpok"), name=self.run_dir.name,
                                       dir=str(self.run_dir), id=run_id, resume="allow")
            tracker.start()
            if config is not None:
                tracker.store_init_configuration(_hparams(config))
            self.trackers.append(tracker)
        if state:
            state_file.write_text(json.dumps(state) + "\n")

    def log(self, values: dict[str, float], step: int) -> None:
        """Finite numbers of ``values`` at ``step`` (NaN and inf are left out, as in the plots)."""
        finite = {k: float(v) for k, v in values.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for tracker in self.trackers:
            tracker.log(finite, step=step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """One RGB image (H, W, 3) uint8, e.g. a prompt grid, under ``key`` at ``step``."""
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({key: image[None]}, step=step, dataformats="NHWC")
            else:
                tracker.log_images({key: [image]}, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []
