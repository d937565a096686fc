"""Data-parallel training over several processes (``accelerate launch`` / ``torchrun``), DDP semantics.

Every process holds the whole model, samples its own share of a round's trajectories with its own
prompt and noise streams, and computes gradients on them; :func:`sync_gradients` averages the
gradients over processes right before each optimizer step (what ``DistributedDataParallel`` does
in its backward hooks), so every process applies the same step and the weights stay identical.

Process information and the process group come from :class:`accelerate.PartialState`. Every
helper here is a no-op (it returns its input) when there is one process, so a plain ``python -m
dpok train`` behaves bitwise as without this module. The collectives use the default process
group; every process must call them in the same order, which is why the algorithms make the same
number of optimizer steps on every process.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as tdist

T = TypeVar("T")

# all-reduce buckets of at most this many elements, so full fine-tuning does not copy every gradient at once
_BUCKET_ELEMENTS = 1 << 26


def _launched_cpu_without_workers() -> bool:
    """``accelerate launch --cpu --num_processes N`` (N > 1) on one machine starts ONE process unless
    it is given an MPI hostfile: it sets MASTER_PORT but no world size. Detect that, rather than
    silently training in one process."""
    env = os.environ
    cpu = env.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")
    return cpu and "MASTER_PORT" in env and launched_processes() == 1 and "WORLD_SIZE" not in env


def launched_processes() -> int:
    """How many processes the launcher (accelerate launch, torchrun, mpirun) started; 1 without one."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def requested_processes(launcher_cmdline: list[str]) -> int:
    """``--num_processes`` of an ``accelerate launch`` command line (its own options only, before the
    training script or ``-m module``); 0 if it is not one or gives none."""
    start = next((i + 1 for i, a in enumerate(launcher_cmdline)
                  if a == "accelerate.commands.launch" or (a == "launch" and i > 0
                                                           and Path(launcher_cmdline[i - 1]).name.startswith("accelerate"))),
                 None)
    if start is None:
        return 0
    args = launcher_cmdline[start:]
    for i, a in enumerate(args):
        if a in ("-m", "--module") or a.endswith(".py"):
            break
        name, _, value = a.partition("=")
        if name in ("--num_processes", "--num-processes"):
            value = value or (args[i + 1] if i + 1 < len(args) else "")
            return int(value) if value.isdigit() else 0
    return 0


def relaunch_cpu_workers(argv: list[str]) -> None:
    """``accelerate launch --cpu --num_processes N`` starts ONE process on one machine unless it has
    an MPI hostfile. In that case replace this process by torch's elastic launcher starting the N
    workers (gloo on the CPU) on the address and port accelerate chose. Needs the launcher's command
    line (Linux ``/proc``); elsewhere :func:`init_processes` explains what to run instead."""
    if not _launched_cpu_without_workers():
        return
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return
    n = requested_processes([a for a in raw.decode(errors="replace").split("\0") if a])
    if n < 2:
        return
    env = os.environ
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(n),
           "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"), "--master_port", env["MASTER_PORT"],
           "-m", "dpok", *argv]
    print(f"accelerate started one CPU process for --num_processes {n}; starting {n} gloo workers", file=sys.stderr,
          flush=True)
    os.execv(sys.executable, cmd)


def init_processes(cpu: bool) -> Any:
    """Join the process group the launcher set up and return accelerate's ``PartialState``; None
    when this is the only process (then nothing global is touched, not even accelerate's state).

    ``cpu=True`` makes a multi-process run use the gloo backend on the CPU (accelerate would
    otherwise only form a group on GPUs).
    """
    from accelerate import PartialState

    if _launched_cpu_without_workers():
        raise ValueError(
            "'accelerate launch --cpu --num_processes N' starts a single process on one machine (accelerate needs "
            "--mpirun_hostfile for several CPU processes). Start N CPU processes with 'accelerate launch --multi_gpu "
            "--num_processes N -m dpok train --device cpu ...' or 'torchrun --nproc_per_node N -m dpok train "
            "--device cpu ...'")
    if launched_processes() == 1 and world_size() == 1:
        return None
    return PartialState(cpu=cpu)


def world_size() -> int:
    """Number of processes in the run (1 without a process group)."""
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def rank() -> int:
    """This process's index, 0 on the main process."""
    return tdist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this is the process that writes the run's files."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process arrives here."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def shutdown() -> None:
    """Leave the process group at the end of a run (nothing to do with one process)."""
    if world_size() > 1:
        tdist.destroy_process_group()


def rank_seed(seed: int, process: int) -> int:
    """The seed of process ``process``'s prompt and noise streams.

    Process 0 uses ``seed`` itself, so a one-process run draws exactly what it always drew; the
    others get independent streams derived from (seed, process), which cannot collide with the
    seed of another run the way ``seed + process`` would.
    """
    if process == 0:
        return seed
    state = np.random.SeedSequence([seed % 2**64, process]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))  # < 2**63: valid for torch, numpy and random alike


# ------------------------------------------------------------------------------------ collectives
def all_gather_objects(obj: T) -> list[T]:
    """``obj`` of every process, in process order, on every process (pickled; keep it small)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def gather_objects(obj: T) -> list[T] | None:
    """``obj`` of every process on the main process (None elsewhere): for large states."""
    if world_size() == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_main() else None
    tdist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: T) -> T:
    """The main process's ``obj`` on every process."""
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(value: int) -> int:
    """Sum of an integer over processes."""
    if world_size() == 1:
        return value
    return int(sum(all_gather_objects(int(value))))


def all_max(value: int) -> int:
    """Maximum of an integer over processes."""
    if world_size() == 1:
        return value
    return int(max(all_gather_objects(int(value))))


def gather_batch(prompts: list[str], values: torch.Tensor) -> tuple[list[str], torch.Tensor, slice]:
    """Every process's (prompts, values (B,)) concatenated in process order, and where this process's
    rows lie in it. One process: the inputs themselves and ``slice(0, B)``."""
    if world_size() == 1:
        return prompts, values, slice(0, len(prompts))
    parts = all_gather_objects((list(prompts), values.detach().cpu()))
    start = sum(len(p) for p, _ in parts[: rank()])
    all_prompts = [p for part, _ in parts for p in part]
    all_values = torch.cat([v for _, v in parts]).to(device=values.device, dtype=values.dtype)
    return all_prompts, all_values, slice(start, start + len(prompts))


def all_mean_std(values: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, mean and unbiased std of the union of every process's ``values`` (1-D, may be empty)."""
    local = values.detach().double()
    parts = all_gather_objects((int(local.numel()), float(local.sum()), float((local * local).sum())))
    n = sum(p[0] for p in parts)
    total, squares = sum(p[1] for p in parts), sum(p[2] for p in parts)
    mean = total / max(n, 1)
    var = max(squares - n * mean * mean, 0.0) / max(n - 1, 1)
    as_tensor = lambda x: torch.tensor(x, dtype=values.dtype, device=values.device)  # noqa: E731
    return n, as_tensor(mean), as_tensor(var**0.5)


# --------------------------------------------------------------------------------- parameters
def sync_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over processes (DDP's all-reduce).

    A process that produced no gradient for a parameter contributes zeros; a parameter without a
    gradient on every process keeps ``grad = None`` (so AdamW still skips it). Called before
    clipping, so the norm, the clipping and the skip-on-non-finite decision are the same everywhere.
    """
    n = world_size()
    params = list(params)
    if n == 1 or not params:
        return
    device = params[0].device
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=device)
    tdist.all_reduce(has_grad)
    buckets: dict[tuple[torch.device, torch.dtype], list[list[torch.nn.Parameter]]] = {}
    for p in params:
        key = (p.device, p.dtype)
        groups = buckets.setdefault(key, [[]])
        if sum(q.numel() for q in groups[-1]) + p.numel() > _BUCKET_ELEMENTS and groups[-1]:
            groups.append([])
        groups[-1].append(p)
    for groups in buckets.values():
        for group in groups:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group])
            tdist.all_reduce(flat)
            flat /= n
            offset = 0
            for p in group:
                p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
                offset += p.numel()
    for p, count in zip(params, has_grad.tolist()):
        if count == 0:
            p.grad = None


def broadcast_parameters(params: Iterable[torch.nn.Parameter]) -> None:
    """Copy the main process's values into every process's parameters (identical start, as DDP)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            tdist.broadcast(p.data, src=0)


def parameters_digest(params: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the parameters' values: equal on every process while they stay in sync."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def to_cpu(tree: Any) -> Any:
    """``tree`` with every tensor moved to the CPU (before pickling it to another process)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def merge_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """One round's metrics, the same on every process: values every process agrees on are kept,
    the others (losses, KL, timings of each process's share) are averaged over processes."""
    if world_size() == 1:
        return metrics
    parts = all_gather_objects(metrics)
    keys = list(dict.fromkeys(k for part in parts for k in part))
    out: dict[str, float] = {}
    for key in keys:
        values = [part[key] for part in parts if key in part]
        same = all(v == values[0] for v in values)
        out[key] = values[0] if same else float(np.mean(values))
    return out
