"""Bookkeeping shared by the long benchmarks (the paper experiment, the tuning sweep): result files
written atomically, image strips, portable paths, and job claims that let several workers share
one output folder."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .utils.diskwrite import write_text_atomic

GRID_IMAGES = 8  # images per prompt kept for the before/after figures


def portable_path(path: str) -> str:
    """``path`` relative to the working directory when inside it (files kept in the repository name
    no machine's folders), else as given."""
    p = Path(path)
    try:
        return p.resolve().relative_to(Path.cwd().resolve()).as_posix() if p.is_absolute() else path
    except ValueError:
        return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write, fsync, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def _save_strip(images: torch.Tensor, path: Path) -> None:
    """The first images of a prompt side by side, as one PNG (used by the report's figures)."""
    a = (images[:GRID_IMAGES].permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(a), axis=1)).save(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(folder: Path) -> bool:
    """Take ``folder``'s job for this process, unless a live process holds it; a claim left by a
    killed worker is taken over (its job resumes from its checkpoints)."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".claim"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                return False
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(folder: Path) -> None:
    (folder / ".claim").unlink(missing_ok=True)
