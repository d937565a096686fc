"""Run checkpoints: everything needed to continue a run bit-identically, in safetensors + JSON.

``RUN/checkpoints/round-000012/`` holds the trainable weights, the optimizer, the algorithm's
state (value function, replay buffer, per-prompt statistics, SFT data), the prompt sampler, the
round and reward-query counters and every RNG state. A multi-process run's checkpoint also holds,
under ``processes``, each further process's own states (see :meth:`dpok.trainer.Trainer.checkpoint`).
Folders are written atomically (see :mod:`dpok.utils.state_io`); a folder without its completion
marker is ignored, and older complete ones are deleted only after a newer one is complete (their
marker first, so a deletion cut short never leaves a folder that looks complete). A process killed
while replacing a checkpoint leaves a complete ``.tmp`` or ``.old`` sibling, which
:func:`latest_checkpoint` puts back. A full disk or a read-only folder is a
:class:`~dpok.utils.diskwrite.RunFolderWriteError` naming the folder and what to free; the
previous checkpoint stays complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .utils.diskwrite import run_folder_writes
from .utils.state_io import COMPLETE_MARKER, CheckpointError, is_complete, load_state, recover_interrupted, save_state

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
    """Write ``state`` as the checkpoint of ``round_``; then keep only the newest ``keep`` complete.

    Raises :class:`~dpok.utils.diskwrite.RunFolderWriteError` when the disk is full or the folder
    is not writable (the partial copy is removed; older checkpoints are untouched).
    """
    path = checkpoint_path(run_dir, round_)
    with run_folder_writes(Path(run_dir), f"checkpoint {path.name}", lambda: latest_complete(run_dir)):
        save_state(path, state)
    complete = list_complete(run_dir)
    for old in complete[: max(0, len(complete) - keep)]:
        remove_checkpoint(old)
    return path


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder, its completion marker first (a kill half-way leaves it incomplete, not broken)."""
    (Path(path) / COMPLETE_MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def latest_complete(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder (not loaded, nothing recovered), or None."""
    complete = list_complete(run_dir)
    return complete[-1] if complete else None


def recover_checkpoints(run_dir: Path) -> None:
    """Put back checkpoints whose replacement was cut short, then remove leftover partial copies.

    For the process that owns the run only (see :func:`~dpok.utils.state_io.recover_interrupted`).
    """
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return
    for leftover in sorted(folder.glob(f"{PREFIX}*.tmp")) + sorted(folder.glob(f"{PREFIX}*.old")):
        recover_interrupted(leftover.with_name(leftover.name[: -len(leftover.suffix)]))
    for leftover in list(folder.glob(f"{PREFIX}*.tmp")) + list(folder.glob(f"{PREFIX}*.old")):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint that loads, or None if the run has none.

    A complete-but-corrupt newest checkpoint is an error naming it (it should not happen, and
    silently going back further would hide lost work). Checkpoints left half-replaced by a killed
    process are put back first (:func:`recover_checkpoints`).
    """
    recover_checkpoints(run_dir)
    complete = list_complete(run_dir)
    if not complete:
        return None
    path = complete[-1]
    try:
        return path, load_state(path)
    except CheckpointError as e:
        raise CheckpointError(f"{e}. Older checkpoints: {[p.name for p in complete[:-1]] or 'none'}") from e
