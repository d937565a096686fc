"""Save and load nested training state (state dicts, optimizer states, RNG states) with no pickle.

A state tree of dicts, lists, numbers, strings and tensors is split into a flat safetensors file
(the tensors) and a JSON file (the structure, with ``{"__tensor__": key}`` where a tensor was).
Folders are written atomically: into a temporary sibling, fsynced, renamed, then a ``COMPLETE``
marker; a folder without the marker is treated as absent.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TENSORS_NAME = "state.safetensors"
TREE_NAME = "state.json"
COMPLETE_MARKER = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint or state file that is missing, truncated or corrupt."""


def flatten_state(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``tree`` into (tensors by key, JSON-able tree with tensor references)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            key = path or "root"
            tensors[key] = node.detach().cpu().contiguous()
            return {"__tensor__": key}
        if isinstance(node, dict):
            out = {}
            for k, v in node.items():
                out[str(k)] = walk(v, f"{path}.{k}" if path else str(k))
            if any(not isinstance(k, str) for k in node):
                out = {"__intkeys__": {str(k): out[str(k)] for k in node}}
            return out
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if isinstance(node, (np.integer,)):
            return int(node)
        if isinstance(node, (np.floating,)):
            return float(node)
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path!r} in a checkpoint")

    return tensors, walk(tree, "")


def unflatten_state(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"__tensor__"}:
                return tensors[node["__tensor__"]]
            if set(node) == {"__intkeys__"}:
                return {int(k): walk(v) for k, v in node["__intkeys__"].items()}
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(tree)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(folder: str | Path, tree: Any, extra_files: dict[str, str] | None = None) -> Path:
    """Atomically write ``tree`` to ``folder`` (replacing an older one only once complete).

    If writing fails (e.g. the disk is full) the temporary sibling is removed, so no partial
    folder is left and the space it took is free again; ``folder`` itself, if it existed, is
    untouched. A process killed at any point leaves ``folder``, or a complete ``.tmp`` / ``.old``
    sibling that :func:`recover_interrupted` puts back in its place.
    """
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        tensors, skeleton = flatten_state(tree)
        save_file(tensors, tmp / TENSORS_NAME)
        (tmp / TREE_NAME).write_text(json.dumps(skeleton))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)
    _fsync_dir(folder.parent)
    return folder


def recover_interrupted(folder: str | Path) -> bool:
    """Put back ``folder`` if a process was killed while :func:`save_state` replaced it.

    Killed after the new copy was complete but before it was renamed, ``folder`` is missing and a
    complete ``folder.tmp`` (the new content) or ``folder.old`` (the previous one) is left: the
    ``.tmp`` is renamed into place if complete, else the ``.old``. Returns whether anything was
    renamed. Only the process that owns the folder should call this (a writer may be between its
    two renames).
    """
    folder = Path(folder)
    if folder.exists():
        return False
    for suffix in (".tmp", ".old"):
        candidate = folder.with_name(folder.name + suffix)
        if candidate.is_dir() and is_complete(candidate):
            candidate.rename(folder)
            _fsync_dir(folder.parent)
            return True
    return False


def is_complete(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def load_state(folder: str | Path) -> Any:
    """Load a tree written by :func:`save_state`; :class:`CheckpointError` names what is wrong."""
    folder = Path(folder)
    if not is_complete(folder):
        raise CheckpointError(f"checkpoint {folder} is incomplete (no {COMPLETE_MARKER} marker)")
    try:
        tensors = load_file(folder / TENSORS_NAME)
        tree = json.loads((folder / TREE_NAME).read_text())
        return unflatten_state(tensors, tree)
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {folder} is corrupt or truncated ({e}); delete it to fall back to an older one"
        ) from e


def rng_state(np_rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Every RNG this process uses: Python, NumPy global and ``np_rng``, torch CPU (and CUDA)."""
    state: dict[str, Any] = {
        "python": json.dumps(random.getstate()),
        "numpy_global": json.dumps(_np_legacy_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    if np_rng is not None:
        state["numpy_generator"] = json.dumps(np_rng.bit_generator.state)
    return state


def _np_legacy_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def set_rng_state(state: dict[str, Any], np_rng: np.random.Generator | None = None) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = json.loads(state["numpy_global"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if np_rng is not None and "numpy_generator" in state:
        np_rng.bit_generator.state = json.loads(state["numpy_generator"])
