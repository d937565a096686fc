"""Clear errors when a run folder cannot be written: the disk is full or the folder is read-only.

:func:`run_folder_writes` turns the operating system's ``OSError`` (``ENOSPC``, ``EDQUOT``,
``EROFS``, ``EACCES``, ``EPERM``, ``EFBIG``) raised while writing into a run folder into a
:class:`RunFolderWriteError` that names the folder, the file, the free space there, roughly how
much to free, the last complete checkpoint (which the atomic writes leave intact) and the command
that continues the run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Write errors that freeing disk space fixes."""
NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
"""Write errors that making the folder writable fixes."""


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a per-process temporary sibling, fsynced, then renamed:
    a kill at any moment leaves the old file or the new one, never a cut-off one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share it
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


class RunFolderWriteError(RuntimeError):
    """Writing into a run folder failed (disk full or folder not writable); the message says what to do."""

    def __init__(self, message: str, folder: Path, code: int) -> None:
        super().__init__(message)
        self.folder = Path(folder)
        self.errno = code


def human_size(n_bytes: float) -> str:
    """``12.3 MiB``-style size."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n_bytes) < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes:.1f} GiB"  # pragma: no cover - the loop returns


def folder_size(folder: Path) -> int:
    """Bytes in the regular files under ``folder`` (0 if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def free_space(path: Path) -> int | None:
    """Free bytes on the disk holding ``path`` (or its nearest existing parent); None if unknown."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def describe_write_error(error: OSError, folder: Path, what: str, last_checkpoint: Path | None) -> str:
    """The message of a :class:`RunFolderWriteError` for ``error`` raised while writing ``what`` into ``folder``."""
    folder = Path(folder)
    target = f" ({error.filename})" if error.filename else ""
    reason = error.strerror or str(error)
    if last_checkpoint is not None:
        keep = (f"The last complete checkpoint, {last_checkpoint}, is intact; after that, continue the run with: "
                f"dpok train --resume {folder}")
    else:
        keep = f"No checkpoint was complete yet; after that, continue the run (from its start) with: dpok train --resume {folder}"
    if error.errno in NO_SPACE:
        free = free_space(folder)
        needed = folder_size(last_checkpoint) if last_checkpoint is not None else 0
        size = f" A checkpoint of this run takes about {human_size(needed)}." if needed else ""
        there = f" ({human_size(free)} free there now)" if free is not None else ""
        return (f"cannot write {what} into {folder}{target}: {reason}{there}.{size} Free at least that much on the disk "
                f"holding {folder} (other runs' folders, files outside this run), or give more quota. {keep}")
    return (f"cannot write {what} into {folder}{target}: {reason}; the folder is not writable. Make it writable (e.g. "
            f"chmod -R u+w {folder}, or mount its disk read-write) or copy the run to a writable disk. {keep}")


@contextlib.contextmanager
def run_folder_writes(folder: Path, what: str, last_checkpoint: Callable[[], Path | None] | None = None) -> Iterator[None]:
    """Re-raise a disk-full or not-writable ``OSError`` of the block as :class:`RunFolderWriteError`.

    ``what`` names what was being written (``checkpoint round-000004``, ``the run's outputs``);
    ``last_checkpoint`` is called, after the failure, to name the checkpoint a resume continues from.
    Other errors pass through unchanged.
    """
    try:
        yield
    except OSError as e:
        if e.errno not in NO_SPACE | NOT_WRITABLE:
            raise
        last = None
        if last_checkpoint is not None:
            try:
                last = last_checkpoint()
            except Exception:  # the message is still worth giving without it
                last = None
        raise RunFolderWriteError(describe_write_error(e, folder, what, last), folder, e.errno) from e
