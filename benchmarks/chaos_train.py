"""Chaos test of training: one run killed with SIGKILL again and again, resumed each time, must end
bit-identical to the same run left alone.

Each attempt starts ``dpok train`` (the first time with ``--output-dir``, then ``--resume``) in a
child process that is killed at a point drawn at random (seeded) from :data:`PHASES`: in the middle
of sampling (at a denoising step), right after an optimizer step of the update, while a checkpoint
file is half written, with a checkpoint complete but not yet renamed into place, between the two
renames that replace a checkpoint, half-way through deleting an old checkpoint, right after a
metrics line, at an evaluation, with the final LoRA file half written, or at a random time sent
from outside (``anytime``). Once the kills are done the run is resumed to its end, and its LoRA
weights (every tensor, bit for bit), ``metrics.jsonl`` (every value but the ``time/`` ones) and
``summary.json`` are compared with an uninterrupted run of the same settings.

The child is a fork of this process (fast: nothing to import again) or, with ``--subprocess``, a
new ``python benchmarks/chaos_train.py --child ...`` interpreter. ``tests/e2e/test_chaos.py`` runs a
short version; ``python benchmarks/chaos_train.py --kills 30`` a long one (prints its numbers,
``--json FILE`` writes them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

TRAINING_PHASES = ("sampling", "update", "checkpoint-write", "checkpoint-marker", "checkpoint-prune", "metrics",
                   "evaluation", "anytime")
FINAL_PHASES = ("checkpoint-swap", "evaluation", "final-save", "anytime")
PHASES = tuple(dict.fromkeys(TRAINING_PHASES + FINAL_PHASES))
"""Where a child may be killed; the final ones once the last round's checkpoint is written."""
MAX_CALL = {"sampling": 4, "update": 4, "checkpoint-write": 2, "checkpoint-marker": 2, "checkpoint-prune": 2,
            "metrics": 2, "evaluation": 1, "checkpoint-swap": 1, "final-save": 1, "anytime": 1}
"""The kill comes at call 1..MAX_CALL[phase] of the phase's function in that child: within about
the first round it runs, so that a run sees many kills before its end."""


@dataclass(frozen=True)
class KillPoint:
    """Kill the child at call ``call`` of ``phase``'s function (``anytime``: ``delay_s`` after it starts)."""

    phase: str
    call: int = 1
    delay_s: float = 0.0

    def __str__(self) -> str:
        return f"{self.phase}@{self.delay_s:.2f}s" if self.phase == "anytime" else f"{self.phase}#{self.call}"


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _truncate(path: Path) -> None:
    """Cut ``path`` to half its size: a write that was still going on."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def install_kill_point(kill: KillPoint) -> None:
    """Patch, in this (child) process, the function of ``kill.phase`` to SIGKILL the process at call ``kill.call``."""
    import pathlib

    import torch

    import dpok.checkpoint as checkpoint
    import dpok.sampling as sampling
    import dpok.utils.state_io as state_io
    from dpok.adapter import DiffusionAdapter
    from dpok.runlog import RunLog
    from dpok.trainer import Trainer

    calls = Counter()

    def at_call(phase: str, when: Callable[..., bool] = lambda *a, **k: True) -> Callable[..., bool]:
        def hit(*args: Any, **kwargs: Any) -> bool:
            if not when(*args, **kwargs):
                return False
            calls[phase] += 1
            return calls[phase] == kill.call
        return hit

    def wrap(owner: Any, name: str, before: Callable[..., bool] | None = None,
             after: Callable[[Any, tuple, dict], None] | None = None, hit: Callable[..., bool] | None = None) -> None:
        real = getattr(owner, name)

        def patched(*args: Any, **kwargs: Any) -> Any:
            fire = hit(*args, **kwargs) if hit else False
            if fire and before is not None:
                before(*args, **kwargs)
            out = real(*args, **kwargs)
            if fire and after is not None:
                after(out, args, kwargs)
            return out

        setattr(owner, name, patched)

    phase = kill.phase
    if phase == "sampling":  # at a denoising step
        wrap(sampling, "step_distribution", before=lambda *a, **k: _die(), hit=at_call(phase))
    elif phase == "update":  # right after an optimizer step: the new weights exist only in memory
        wrap(torch.optim.AdamW, "step", after=lambda *a: _die(), hit=at_call(phase))
    elif phase == "checkpoint-write":  # the checkpoint's tensor file half written
        wrap(state_io, "save_file", after=lambda out, a, k: (_truncate(Path(a[1])), _die()), hit=at_call(phase))
    elif phase == "checkpoint-marker":  # complete in its .tmp folder, not yet renamed into place
        wrap(state_io, "_fsync_dir", after=lambda *a: _die(),
             hit=at_call(phase, lambda path: Path(path).name.endswith(".tmp")))
    elif phase == "checkpoint-swap":  # the old copy moved aside, the new one not yet in its place
        wrap(pathlib.Path, "rename", after=lambda *a: _die(),
             hit=at_call(phase, lambda self, target: str(target).endswith(".old")))
    elif phase == "checkpoint-prune":  # an old checkpoint half deleted
        def half_delete(path: Path) -> None:
            (Path(path) / state_io.COMPLETE_MARKER).unlink(missing_ok=True)
            (Path(path) / state_io.TENSORS_NAME).unlink(missing_ok=True)
            _die()
        wrap(checkpoint, "remove_checkpoint", before=half_delete, hit=at_call(phase))
    elif phase == "metrics":  # a round logged, its checkpoint not yet written
        wrap(RunLog, "write", after=lambda *a: _die(), hit=at_call(phase))
    elif phase == "evaluation":
        wrap(Trainer, "evaluate", before=lambda *a, **k: _die(), hit=at_call(phase))
    elif phase == "final-save":  # the LoRA file half written
        wrap(DiffusionAdapter, "save_lora", after=lambda out, a, k: (_truncate(Path(out)), _die()), hit=at_call(phase))
    elif phase != "anytime":  # anytime: the parent kills from outside
        raise ValueError(f"unknown kill phase {phase!r}; one of {', '.join(PHASES)}")


def child_main(argv: list[str], kill: KillPoint | None) -> int:
    """What a child runs: ``dpok train ARGV`` with ``kill`` installed; its exit code."""
    from dpok.cli import main

    if kill is not None:
        install_kill_point(kill)
    return main(["train", *argv])


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def no_background_threads() -> list[str]:
    """Stop tqdm's monitor thread (and keep it from starting again); the names of the threads left.

    A fork copies only the calling thread: a lock another thread held at that moment stays locked
    in the child for ever (tqdm's monitor holds tqdm's lock, and the child's progress bar hangs)."""
    import threading

    import tqdm.auto
    import tqdm.std

    for cls in {tqdm.std.tqdm, tqdm.auto.tqdm}:  # each class starts a monitor of its own
        cls.monitor_interval = 0
        monitor = cls.__dict__.get("monitor")
        if monitor is not None:
            monitor.exit()
            cls.monitor = None
    return [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]


def run_child(argv: list[str], kill: KillPoint | None, log: Path, fork: bool = True, timeout_s: float = 300.0) -> int:
    """Run one child to its end (or its kill); its exit code (-9 when killed). Raises TimeoutError
    (after killing it) if it runs past ``timeout_s``."""
    others = no_background_threads() if fork else []
    with open(log, "ab") as out:
        out.write(f"\n=== dpok train {' '.join(argv)}  (kill at {kill or 'nothing'})\n".encode())
        if others:
            out.write(f"(forked while these threads ran: {', '.join(others)})\n".encode())
    started = time.monotonic()
    if fork:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(log, os.O_WRONLY | os.O_APPEND)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = child_main(argv, kill)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:  # noqa: B036 - a child must never return into the caller's code
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
    else:
        spec = [] if kill is None else ["--kill", f"{kill.phase}:{kill.call}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", *spec, "--", *argv],
                                    env=env, stdout=out, stderr=out)
        pid = proc.pid
    killed_at = started + kill.delay_s if kill is not None and kill.phase == "anytime" else None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return _exit_code(status)
        now = time.monotonic()
        if killed_at is not None and now >= killed_at:
            os.kill(pid, signal.SIGKILL)
            killed_at = None
        if now - started > timeout_s:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"a training child ran past {timeout_s:.0f} s; see {log}")
        time.sleep(0.01)


def warm_imports() -> None:
    """Import what ``dpok train`` imports lazily (diffusers' models, peft, TensorBoard)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    from dpok.cli import build_parser

    build_parser()


def run_in_this_process(argv: list[str], log: Path) -> int:
    """``dpok train ARGV`` in this process, its output appended to ``log``; its exit code."""
    import contextlib

    with open(log, "a") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        print(f"\n=== dpok train {' '.join(argv)}  (in this process, not killed)", flush=True)
        try:
            return child_main(argv, None)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1


@dataclass
class ChaosResult:
    """What a chaos run measured."""

    kills: int = 0  # children killed by SIGKILL, each resumed
    by_phase: dict[str, int] = field(default_factory=dict)
    children: int = 0
    identical_lora: bool = False
    identical_metrics: bool = False
    identical_summary: bool = False
    tensors_compared: int = 0
    rounds_compared: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        """The interrupted run ended bit-identical to the uninterrupted one, with no child failing."""
        return self.identical_lora and self.identical_metrics and self.identical_summary and not self.errors


def _final_stage(run: Path, rounds: int) -> bool:
    from dpok.checkpoint import latest_complete

    last = latest_complete(run)
    return last is not None and int(last.name.split("-")[1]) >= rounds


def _has_checkpoint(run: Path) -> bool:
    from dpok.checkpoint import latest_complete

    return latest_complete(run) is not None


def _metrics_rows(folder: Path) -> list[dict[str, Any]]:
    from dpok.runlog import read_metrics

    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in read_metrics(folder / "metrics.jsonl")]


def compare_runs(a: Path, b: Path, result: ChaosResult) -> None:
    """Fill ``result``'s ``identical_*`` fields: LoRA tensors, metrics rows and summary of runs ``a`` and ``b``."""
    import torch
    from safetensors.torch import load_file

    name = "lora/pytorch_lora_weights.safetensors"
    if (a / name).is_file() and (b / name).is_file():
        ta, tb = load_file(a / name), load_file(b / name)
        result.tensors_compared = len(ta)
        result.identical_lora = ta.keys() == tb.keys() and all(
            ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
    ra, rb = _metrics_rows(a), _metrics_rows(b)
    result.rounds_compared = len(ra)
    result.identical_metrics = bool(ra) and json.dumps(ra) == json.dumps(rb)
    sa, sb = a / "summary.json", b / "summary.json"
    result.identical_summary = sa.is_file() and sb.is_file() and json.loads(sa.read_text()) == json.loads(sb.read_text())


def chaos_run(train_argv: list[str], workdir: Path, kills: int, rounds: int, seed: int = 0, fork: bool = True,
              time_limit_s: float = 1800.0) -> ChaosResult:
    """Kill a ``dpok train TRAIN_ARGV`` run ``kills`` times (see the module docstring) and compare it
    with an uninterrupted one. ``train_argv`` has no ``--output-dir``; ``rounds`` is its ``--rounds``.

    With ``fork``, torch runs on one thread meanwhile: a forked child that used the OpenMP thread
    pool of its parent would wait for threads that the fork did not copy.
    """
    import torch

    threads = torch.get_num_threads()
    if fork:
        torch.set_num_threads(1)
    try:
        return _chaos_run(train_argv, workdir, kills, rounds, seed, fork, time_limit_s)
    finally:
        torch.set_num_threads(threads)


def _chaos_run(train_argv: list[str], workdir: Path, kills: int, rounds: int, seed: int, fork: bool,
               time_limit_s: float) -> ChaosResult:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "children.log"
    result = ChaosResult()
    t0 = time.monotonic()
    reference, run = workdir / "uninterrupted", workdir / "interrupted"
    ref_argv = [*train_argv, "--output-dir", str(reference)]
    if fork:  # the uninterrupted run in this process: every lazy import is then done for the forked children
        warm_imports()
        no_background_threads()
        started = time.monotonic()
        code = run_in_this_process(ref_argv, log)
    else:
        started = time.monotonic()
        code = run_child(ref_argv, None, log, fork)
    one_run_s = time.monotonic() - started
    result.children += 1
    if code != 0:
        result.errors.append(f"the uninterrupted run failed with exit code {code}; see {log}")
        return result
    rng = random.Random(seed)
    # most kills while training; the last ones (at least one per final phase) once every round is done,
    # in resumes that redo the final checkpoint, evaluation and save
    final_kills = min(kills, max(len(FINAL_PHASES), kills // 4))
    attempts = 0
    while result.kills < kills and attempts < 4 * kills and time.monotonic() - t0 < time_limit_s:
        attempts += 1
        final = _final_stage(run, rounds)
        phases = FINAL_PHASES if final else TRAINING_PHASES
        if not final and _has_checkpoint(run):  # a resumed run evaluates only at its end
            phases = tuple(p for p in phases if p != "evaluation")
        fewest = min(result.by_phase.get(p, 0) for p in phases)  # every phase gets its turn, in random order
        phase = rng.choice([p for p in phases if result.by_phase.get(p, 0) == fewest])
        kill: KillPoint | None = KillPoint(phase, rng.randint(1, MAX_CALL[phase]), rng.uniform(0.05, one_run_s / 3))
        if not final and result.kills >= kills - final_kills:
            kill = None  # enough kills while training: this child runs to the end
        argv = ["--resume", str(run)] if (run / "config.json").is_file() else [*train_argv, "--output-dir", str(run)]
        try:
            code = run_child(argv, kill, log, fork)
        except TimeoutError as e:
            result.errors.append(f"a child to be killed at {kill} hung: {e}")
            break
        result.children += 1
        result.schedule.append(f"{kill}: {'killed' if code == -9 else f'exit {code}'}")
        if code == -9 and kill is not None:
            result.kills += 1
            result.by_phase[phase] = result.by_phase.get(phase, 0) + 1
        elif code != 0:
            result.errors.append(f"a child to be killed at {kill or 'nothing'} exited with {code}; see {log}")
            break
    if not result.errors and code != 0:  # the last child was killed: one more resume, left alone, to the end
        code = run_child(["--resume", str(run)], None, log, fork)
        result.children += 1
        if code != 0:
            result.errors.append(f"the last resume failed with exit code {code}; see {log}")
    result.by_phase = dict(sorted(result.by_phase.items()))
    compare_runs(reference, run, result)
    result.seconds = time.monotonic() - t0
    return result


def tiny_train_argv(pipeline: Path, reward: Path, rounds: int) -> list[str]:
    """``dpok train`` options of a tiny run on a random pipeline: every round checkpointed, two kept."""
    return ["--model", str(pipeline), "--alignment-model", str(reward), "--prompt", "a red circle", "--prompt",
            "two blue squares", "--rounds", str(rounds), "--samples-per-round", "2", "--sample-batch-size", "2",
            "--minibatch-size", "2", "--gradient-steps", "2", "--num-steps", "3", "--eval-images", "1",
            "--learning-rate", "0.01", "--clip-range", "0.1", "--checkpoint-every", "1", "--keep-checkpoints", "2",
            "--device", "cpu"]


def describe(result: ChaosResult) -> str:
    """A short text report of ``result``."""
    phases = ", ".join(f"{k} {v}" for k, v in result.by_phase.items())
    lines = [f"chaos test: {result.kills} kill -9 interruptions ({phases}), {result.children} child runs, "
             f"{result.seconds:.0f} s",
             f"  LoRA identical: {result.identical_lora} ({result.tensors_compared} tensors); metrics identical: "
             f"{result.identical_metrics} ({result.rounds_compared} rounds); summary identical: {result.identical_summary}"]
    lines += [f"  ! {e}" for e in result.errors]
    lines.append("PASS" if result.identical else "FAIL")
    return "\n".join(lines)


def _tiny_models(folder: Path) -> tuple[Path, Path]:
    """A tiny random pipeline and alignment reward (as in the tests), built into ``folder``."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_pipeline

    from dpok.embedded.alignment import AlignmentNet, AlignmentRewardModel

    pipeline = build_tiny_pipeline(folder / "tiny-sd")
    torch.manual_seed(0)
    reward = folder / "tiny-alignment"
    AlignmentRewardModel(AlignmentNet(width=16)).save(reward)
    return pipeline, reward


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--child":  # a subprocess child: --child [--kill PHASE:CALL] -- TRAIN_ARGS
        rest = argv[1:]
        kill = None
        if rest[:1] == ["--kill"]:
            phase, call = rest[1].split(":")
            kill, rest = KillPoint(phase, int(call)), rest[2:]
        return child_main(rest[1:] if rest[:1] == ["--"] else rest, kill)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=30, help="kill -9 interruptions to survive")
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subprocess", action="store_true", help="each child a new interpreter (slower) instead of a fork")
    parser.add_argument("--workdir", default="", help="folder for the runs (default: a temporary one)")
    parser.add_argument("--json", default="", help="write the numbers to this JSON file")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dpok-chaos-"))
    pipeline, reward = _tiny_models(workdir / "models")
    result = chaos_run(tiny_train_argv(pipeline, reward, args.rounds), workdir, args.kills, args.rounds, args.seed,
                       fork=not args.subprocess)
    print(describe(result))
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(result), "identical": result.identical}, indent=2) + "\n")
    return 0 if result.identical else 1


if __name__ == "__main__":
    sys.exit(main())
