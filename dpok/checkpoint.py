"""Run checkpoints: everything needed to continue a run bit-identically, in safetensors + JSON.

``RUN/checkpoints/round-000012/`` holds the trainable weights, the optimizer, the algorithm's
state (value function, replay buffer, per-prompt statistics, SFT data), the prompt sampler, the
round and reward-query counters and every RNG state. A multi-process run's checkpoint also holds,
under ``processes``, each further process's own states (see :meth:`dpok.trainer.Trainer.checkpoint`).
Folders are written atomically (see :mod:`dpok.utils.state_io`); a folder without its completion
marker is ignored, and older complete ones are deleted only after a newer one is complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .utils.state_io import CheckpointError, is_complete, load_state, save_state

PREFIX = "round-"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_complete(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(
        (".tmp", ".old")) and is_complete(p)]
    return sorted(found, key=lambda p: p.name)


def checkpoint_path(run_dir: Path, round_: int) -> Path:
    """Where the checkpoint of ``round_`` is (or will be) written."""
    return checkpoint_dir(run_dir) / f"{PREFIX}{round_:06d}"


def write_checkpoint(run_dir: Path, round_: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of ``round_``; then keep only the newest ``keep`` complete."""
    path = checkpoint_path(run_dir, round_)
    save_state(path, state)
    complete = list_complete(run_dir)
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint that loads, or None if the run has none.

    A complete-but-corrupt newest checkpoint is an error naming it (it should not happen, and
    silently going back further would hide lost work).
    """
    complete = list_complete(run_dir)
    if not complete:
        return None
    path = complete[-1]
    try:
        return path, load_state(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Older checkpoints: {[p.name for p in complete[:-1]] or 'none'}") from e
