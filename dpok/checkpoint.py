"""Run checkpoints: everything needed to continue a run bit-identically, in safetensors + JSON.

``RUN/checkpoints/round-000012/`` holds the trainable weights, the optimizer, the algorithm's
state (value function, replay buffer, per-prompt statistics, SFT data), the prompt sampler, the
round and reward-query counters and every RNG state. A multi-process run's checkpoint also holds,
under ``processes``, each further process's own states (see :func:`save_run`).
Folders are written atomically (see :mod:`dpok.utils.state_io`); a folder without its completion
marker is ignored, and older complete ones are deleted only after a newer one is complete (their
marker first, so a deletion cut short never leaves a folder that looks complete). A process killed
while replacing a checkpoint leaves a complete ``.tmp`` or ``.old`` sibling, which
:func:`latest_checkpoint` puts back. A full disk or a read-only folder is a
:class:`~dpok.utils.diskwrite.RunFolderWriteError` naming the folder and what to free; the
previous checkpoint stays complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from . import distributed
from .runlog import read_metrics
from .utils.diskwrite import run_folder_writes
from .utils.state_io import (
    COMPLETE_MARKER,
    CheckpointError,
    is_complete,
    load_state,
    recover_interrupted,
    rng_state,
    save_state,
    set_rng_state,
)

if TYPE_CHECKING:
    from .run_parts import RunParts

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


# ------------------------------------------------------------------------------- a run's state
# what differs between the processes of a run; the rest (weights, optimizer, counters) is the same on all
PER_PROCESS = ("algorithm", "prompt_sampler", "rng", "generator")

# a run's progress: rounds done, reward queries made, the base model's reward per prompt (None
# until the first evaluation); read back by load_run_state as a tuple in this order
Progress = tuple[int, int, dict[str, float] | None]


def run_state(parts: RunParts, progress: Progress) -> dict[str, Any]:
    """This process's state of the run: trainable weights, optimizer, algorithm, prompt sampler,
    RNG and generator states, the EMA (with ``--ema-decay``) and the ``progress`` counters."""
    round_, reward_queries, before = progress
    trainable = {n: p.detach().cpu() for n, p in parts.adapter.unet.named_parameters() if p.requires_grad}
    return {
        "round": round_, "reward_queries": reward_queries, "before": before,
        "trainable": trainable, "optimizer": parts.optimizer.state_dict(),
        "algorithm": parts.algorithm.state_dict(), "prompt_sampler": parts.sampler.state_dict(),
        "rng": rng_state(parts.rng), "generator": parts.generator.get_state(),
        **({"ema": parts.ema.state_dict()} if parts.ema is not None else {}),
    }


def load_run_state(parts: RunParts, state: dict[str, Any]) -> Progress:
    """Restore :func:`run_state` into ``parts`` (or a checkpoint of a multi-process run: there each
    process takes its own entry of ``state["processes"]``, the main process's is the top level);
    returns the saved progress."""
    saved = int(state.get("num_processes", 1))
    if saved != parts.num_processes:
        raise CheckpointError(f"the checkpoint was written by a run of {saved} process(es); resume it with "
                              f"{saved} (this run has {parts.num_processes}) so that it continues identically")
    mine = state if parts.rank == 0 else state["processes"][parts.rank]
    params = dict(parts.adapter.unet.named_parameters())
    missing = [n for n in state["trainable"] if n not in params]
    if missing:
        raise CheckpointError(f"checkpoint weights {missing[:3]} do not match this model's trainable parameters; "
                              "resume with the same --model, --finetune and LoRA settings")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.ema is not None:
        if "ema" not in state:
            raise CheckpointError("the checkpoint holds no EMA weights; it was written without --ema-decay")
        parts.ema.load_state_dict(state["ema"])
    parts.algorithm.load_state_dict(mine["algorithm"])
    parts.sampler.load_state_dict(mine["prompt_sampler"])
    set_rng_state(mine["rng"], parts.rng)
    parts.generator.set_state(mine["generator"])
    return int(state["round"]), int(state["reward_queries"]), state["before"]


def save_run(parts: RunParts, progress: Progress) -> tuple[Path, str | None]:
    """Write the run's checkpoint (main process); with several processes every one must call this.

    A multi-process checkpoint adds ``num_processes`` and ``processes``: for each process r >= 1
    its own algorithm state (replay buffer, SFT data), prompt sampler, RNG and generator states,
    gathered to the main process. Each process's digest of the replicated weights is compared
    first: a mismatch means the processes diverged, and no checkpoint is written. Returns the
    checkpoint's path and that error (None when written), the same on every process.
    """
    state = run_state(parts, progress)
    round_, keep = progress[0], parts.cfg.keep_checkpoints
    if parts.num_processes == 1:
        return write_checkpoint(parts.out, round_, state, keep), None
    own = {k: state[k] for k in PER_PROCESS}
    own["weights_digest"] = distributed.parameters_digest(parts.replicated_parameters())
    gathered = distributed.gather_objects(distributed.to_cpu(own))
    error = None
    if gathered is not None:
        digests = [g["weights_digest"] for g in gathered]
        if len(set(digests)) > 1:
            error = (f"the processes' weights differ after round {round_} (digests {digests}): they must "
                     "stay identical; no checkpoint was written")
        else:
            state.update(num_processes=parts.num_processes, weights_digest=digests[0],
                         processes={r: gathered[r] for r in range(1, parts.num_processes)})
            write_checkpoint(parts.out, round_, state, keep)
    error = distributed.broadcast_object(error)  # also: nobody goes on before the checkpoint exists
    return checkpoint_path(parts.out, round_), error


def resume_run(parts: RunParts) -> Progress | None:
    """Load the run folder's newest checkpoint into ``parts`` and drop the metrics logged after it;
    None when it has none yet (the run then starts again from its beginning, as a fresh run)."""
    out = parts.out
    found = latest_checkpoint(out)
    if found is None:
        # stopped before its first checkpoint: this run's start is what a fresh run does (same seed)
        if parts.is_main:
            (out / "metrics.jsonl").unlink(missing_ok=True)
            tqdm.write(f"{out} has no complete checkpoint yet: running it again from its start")
        distributed.barrier()
        return None
    path, state = found
    progress = load_run_state(parts, state)
    if parts.is_main:
        # rounds logged after the checkpoint will be run again: drop their lines
        rows = [r for r in read_metrics(out / "metrics.jsonl") if r["round"] <= progress[0]]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tqdm.write(f"resumed {out} from {path.name} (round {progress[0]})")
    distributed.barrier()  # every process has read the checkpoint before the main one may replace it
    return progress
