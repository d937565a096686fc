"""The training loop: sample -> score -> update -> log -> checkpoint, each phase a small function.

A run folder holds ``config.json``, ``metrics.jsonl`` (one line per round), TensorBoard events,
``lora/pytorch_lora_weights.safetensors`` (or ``unet/`` for full fine-tuning),
``samples_before.png`` / ``samples_after.png`` (same prompts, same seeds), ``curves.png``,
``summary.json`` and ``checkpoints/``.

Several processes (``accelerate launch --multi_gpu --num_processes N -m dpok train``, or
``torchrun``) train data-parallel: each samples ``samples_per_round / N`` trajectories with its own
prompt and noise streams, gradients are averaged before every optimizer step (see
:mod:`dpok.distributed`), rewards are gathered for the statistics and metrics, and only the main
process evaluates and writes files while the others wait for it.

The parts of a run are built by :func:`dpok.run_parts.build_run`; checkpoints are
:mod:`dpok.checkpoint`'s, evaluations :mod:`dpok.periodic_eval`'s, the files of a finished run
:mod:`dpok.outputs`'.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from . import distributed, periodic_eval
from .algorithms import Rollout
from .checkpoint import latest_checkpoint, latest_complete, load_run_state, resume_run, run_state, save_run
from .config import TrainConfig
from .core import lr_factor
from .outputs import save_grid, save_outputs, write_config_files
from .prompts import PromptFunction
from .rewards import Reward, RewardOutput
from .run_parts import GRID_PROMPTS, RunParts, build_run
from .run_parts import prepare_prompts as prepare_prompts  # where it lived before run_parts
from .runlog import RunLog
from .sampling import SampleSettings, Trajectory, sample_in_batches, trajectory_kl
from .scoring import RoundScorer, overlap_enabled, score_batch
from .utils.diskwrite import run_folder_writes


class TrainingDiverged(RuntimeError):
    """Too many skipped updates in a row, or processes whose weights differ."""


@dataclass
class RunResult:
    output_dir: Path
    reward_before: float
    reward_after: float
    files: dict[str, str] = field(default_factory=dict)
    main_process: bool = True  # False on the other processes of a multi-process run (they print nothing)


class Trainer:
    """Runs the loop over the parts of one run (:class:`~dpok.run_parts.RunParts`: model, reward,
    algorithm, optimizer, run folder, ...), which read as its own attributes (``trainer.adapter``)."""

    rollout_kl_samples = 4  # trajectories of a round whose KL to the base is logged (kl/rollout)

    def __init__(self, cfg: TrainConfig | None, config_format: str = "yaml", *, pipeline: Any = None,
                 reward: Reward | None = None, prompt_fn: PromptFunction | None = None,
                 parts: RunParts | None = None) -> None:
        """``config_format``: ``yaml`` or ``toml``, the format of the resolved ``config.<format>``
        written into the run folder beside ``config.json`` (the format of the run's ``--config`` file).

        From Python (see :func:`dpok.api.train`): ``pipeline``, a diffusers pipeline object to train
        instead of loading ``cfg.model`` (changed in place); ``reward``, a :class:`~dpok.rewards.Reward`
        instead of ``cfg.reward``; ``prompt_fn``, ``fn(rng) -> prompt or (prompt, metadata)`` drawing
        the training prompts instead of ``cfg.prompt`` / ``prompt_file`` / ``prompt_set``; ``parts``,
        the run's parts already built by :func:`~dpok.run_parts.build_run` (then ``cfg`` is theirs)."""
        if config_format not in ("yaml", "toml"):
            raise ValueError(f"config_format must be 'yaml' or 'toml' (got {config_format!r})")
        if parts is None and cfg is None:
            raise ValueError("give a TrainConfig or the run's parts")
        self.config_format = config_format
        self.parts = parts if parts is not None else build_run(cfg, pipeline=pipeline, reward=reward,
                                                               prompt_fn=prompt_fn)
        self.round = 0
        self.reward_queries = 0
        self.before: dict[str, float] | None = None
        self.stop_signal: int | None = None
        self.bad_rounds = 0
        self.update_skipped = False
        if self.cfg.resume:
            progress = resume_run(self.parts)
            if progress is not None:
                self.round, self.reward_queries, self.before = progress
        self.log: RunLog | None = RunLog(self.out, self.cfg.report_to, self.cfg.to_dict()) if self.is_main else None

    def __getattr__(self, name: str) -> Any:
        # only reached for names the trainer does not hold itself: the run's parts
        if name == "parts":
            raise AttributeError(name)
        return getattr(self.parts, name)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return run_state(self.parts, (self.round, self.reward_queries, self.before))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (see :func:`dpok.checkpoint.load_run_state`)."""
        self.round, self.reward_queries, self.before = load_run_state(self.parts, state)

    def checkpoint(self) -> Path:
        """Write a checkpoint (main process); with several processes every one must call this
        (see :func:`dpok.checkpoint.save_run`)."""
        path, error = save_run(self.parts, (self.round, self.reward_queries, self.before))
        if error:
            raise TrainingDiverged(error)
        return path

    # ------------------------------------------------------------------------------- phases
    def sample(self, prompts: list[str], on_batch: Callable[[Trajectory], None] | None = None,
               shared_noise: int = 0) -> Trajectory:
        """The round's trajectories, in sampling batches; ``on_batch`` gets each batch once sampled;
        ``shared_noise`` = k: each group of k in a row starts from one x_T."""
        cfg = self.cfg
        steps, eta = self.algorithm.rollout_sampler()
        with self.algorithm.sampling_policy():
            return sample_in_batches(self.adapter, prompts, cfg.sample_batch_size, steps, eta,
                                     cfg.guidance_scale, self.generator,
                                     reference=self.algorithm.samples_from_reference,
                                     logprob_reduce=cfg.logprob_reduce, with_log_probs=eta > 0, on_batch=on_batch,
                                     keep_means=self.rollout_kl_samples if eta > 0 else 0, shared_noise=shared_noise,
                                     branch_step=self.cfg.policy_gradient.branch_step if shared_noise else 0,
                                     solver=self.algorithm.rollout_solver())

    def noise_groups(self, prompts: list[str]) -> tuple[int, list[str] | None]:
        """(k, a group key per sample) with --shared-noise, else (0, None): each run of k samples of a
        prompt shares its x_T and is its own advantage group (keys unique over processes)."""
        if not self.cfg.policy_gradient.shared_noise:
            return 0, None
        k = self.cfg.group_size(self.num_processes)
        return k, [f"{p}\x1f{self.rank}:{i // k}" for i, p in enumerate(prompts)]

    def score(self, traj: Trajectory, attempts: int = 3) -> RewardOutput:
        """Score samples (one call per sampling batch, as a round does). If the reward fails (e.g. its
        server is down after its own retries), the samples are kept and scored again, never given a
        made-up score (see :func:`dpok.scoring.score_batch`)."""
        size = self.cfg.sample_batch_size
        out = RewardOutput.cat([score_batch(self.reward, traj.images[i : i + size], traj.prompts[i : i + size],
                                            self.round + 1, attempts) for i in range(0, traj.batch_size, size)])
        self.reward_queries += distributed.all_sum(len(traj.prompts))  # the run's total, over processes
        return out

    def rollout_kl(self, traj: Trajectory) -> float:
        """Sum over steps of the closed-form KL_t to the pretrained policy, summed over latent
        elements (nats) and averaged over (at most ``rollout_kl_samples``) trajectories of this round,
        with the policy that sampled them: the DPOK bound on KL(p_theta(x_0|z) || p_pre(x_0|z)).
        The policy's step means were kept at sampling, so only the reference model runs here."""
        cfg, n = self.cfg, min(self.rollout_kl_samples, traj.batch_size)
        steps, eta = self.algorithm.rollout_sampler()
        if eta == 0:  # deterministic rollouts: no step distributions, no KL bound
            return float("nan")
        settings = SampleSettings(n, steps, cfg.guidance_scale, eta)
        with self.algorithm.sampling_policy():
            kl = trajectory_kl(self.adapter, traj, settings, chunk=n, reduce="sum", limit=n)
        return float(kl.mean())

    def train_round(self) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        # samples_per_round is the round's total: each process draws its share
        prompts = self.sampler.sample_groups(cfg.samples_per_round // self.num_processes,
                                             cfg.group_size(self.num_processes))
        batches = -(-len(prompts) // cfg.sample_batch_size)
        overlap = overlap_enabled(cfg.reward_overlap, self.reward, batches)
        # with overlap each batch is scored while the next is sampled; the worker ends with the block
        with RoundScorer(self.reward, overlap, self.round + 1) as scorer:
            shared, groups = self.noise_groups(prompts)
            traj = self.sample(prompts, on_batch=scorer.submit, shared_noise=shared)
            t1 = time.perf_counter()
            # before the update: the KL of the policy that sampled these trajectories (beside the
            # last batch's scoring, with overlap)
            rollout_kl = self.rollout_kl(traj)
            t2 = time.perf_counter()
            scored = scorer.result()
        self.reward_queries += distributed.all_sum(len(traj.prompts))  # the run's total, over processes
        t3 = time.perf_counter()
        lr = cfg.learning_rate * lr_factor(self.round, cfg.rounds, cfg.lr_schedule, cfg.lr_warmup_rounds)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.adapter.train(True)
        update = self.algorithm.update(Rollout(traj, scored.scores, scored.valid, groups))
        self.adapter.train(False)
        t4 = time.perf_counter()
        # reward statistics over every process's samples (one process: its own)
        _, scores, _ = distributed.gather_batch(traj.prompts, scored.scores)
        _, valid_mask, _ = distributed.gather_batch(traj.prompts, scored.valid)
        valid = scores[valid_mask]
        metrics = {f"train/{k}": v for k, v in update.metrics().items()}
        metrics.update({
            "reward/mean": float(valid.mean()) if len(valid) else float("nan"),
            "reward/std": float(valid.std()) if len(valid) > 1 else 0.0,
            "reward/invalid": float(distributed.all_sum(scored.num_invalid)),
            "kl/rollout": rollout_kl, "train/learning_rate": lr,
            # time/reward_s: the wait for the scores; time/reward_busy_s: the reward calls (more, with overlap)
            "time/sample_s": t1 - t0, "time/kl_s": t2 - t1, **scorer.timings(), "time/update_s": t4 - t3,
            "charts/reward_queries": float(self.reward_queries),
        })
        # any process's skipped update makes the round a bad one on every process
        self.update_skipped = bool(distributed.all_max(int(update.skipped)))
        # the same dict on every process, so that every process takes the same stop decisions
        return distributed.merge_metrics(metrics)

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, prompts: list[str], base: bool = False) -> tuple[dict[str, float], list[np.ndarray]]:
        """Mean reward per prompt over ``eval_images`` fixed-seed samples, and the grid rows (see
        :func:`dpok.periodic_eval.before_after_rewards`)."""
        return periodic_eval.before_after_rewards(self.parts, prompts, base)

    def _check_bad_round(self, metrics: dict[str, float]) -> None:
        """Count rounds in a row whose update was skipped; stop at ``max_bad_rounds``."""
        self.bad_rounds = self.bad_rounds + 1 if self.update_skipped else 0
        if self.bad_rounds >= self.cfg.max_bad_rounds:
            last = latest_checkpoint(self.out)
            where = f"the last good checkpoint is {last[0]}" if last else "no checkpoint was written before"
            raise TrainingDiverged(
                f"{self.bad_rounds} rounds in a row had their update skipped (non-finite loss or gradient, or every "
                f"reward invalid; see reward/invalid and train/skipped_* in {self.out / 'metrics.jsonl'}); {where}. Lower "
                "--learning-rate or check the reward, then --resume")

    def _eval_due(self, rounds: int) -> bool:
        """Whether ``--eval-every`` evaluates after the round just finished (every N rounds and the last)."""
        every = self.cfg.eval_every
        return bool(every) and self.algorithm.trains and (self.round % every == 0 or self.round == rounds)

    def periodic_eval(self) -> dict[str, float] | None:
        """The ``--eval-every`` evaluation of the current policy (main process; the others wait):
        ``eval/*`` means to ``eval.jsonl``, a grid to ``eval/round-N.png``, ``eval_curves.png``."""
        return periodic_eval.evaluate_run(self.parts, self.round, self.log)

    def _grid(self, rows: list[np.ndarray], prompts: list[str], name: str, scores: dict[str, float]) -> Path:
        return save_grid(self.out, rows, prompts, name, scores, self.log, self.round)

    # ---------------------------------------------------------------------------------- run
    def run(self) -> RunResult:
        cfg, main = self.cfg, self.is_main
        if main:
            write_config_files(cfg, self.out, self.config_format)
        shown = self.prompts[:GRID_PROMPTS]
        if main:
            procs = f" on {self.num_processes} processes" if self.num_processes > 1 else ""
            tqdm.write(f"{cfg.algorithm} on {cfg.model} with reward {cfg.reward.name}: {len(self.prompts)} prompt(s), "
                       f"{cfg.rounds} rounds x {cfg.samples_per_round} samples{procs}; run folder {self.out}")
        if self.before is None:
            if main:  # evaluation and grids: the main process only, the others wait for its result
                self.before, rows = self.evaluate(shown, base=True)
                self._grid(rows, shown, "samples_before.png", self.before)
            self.before = distributed.broadcast_object(self.before)
        before = self.before
        rounds = cfg.rounds if self.algorithm.trains else 0
        if main and cfg.resume:  # the evaluations after the checkpoint's round are made again
            periodic_eval.truncate(self.out, self.round if self.round > 0 else -1)
        if self.round == 0 and cfg.eval_every and self.algorithm.trains:
            self.periodic_eval()  # the base model: where the curves start
        bar = tqdm(range(self.round, rounds), desc=f"{cfg.algorithm}", initial=self.round, total=rounds,
                   dynamic_ncols=True, file=sys.stderr, disable=not main)
        with stop_on_signals(self):
            for r in bar:
                metrics = self.train_round()
                self.round = r + 1
                if self.log is not None:
                    self.log.write(self.round, metrics)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", kl=f"{metrics['kl/rollout']:.2f}")
                self._check_bad_round(metrics)
                if self._eval_due(rounds):
                    self.periodic_eval()
                # a signal may reach only some processes: all stop if any got one
                stop = distributed.all_max(self.stop_signal or 0)
                if stop:
                    self.stop_signal = stop
                    bar.close()
                    path = self.checkpoint()
                    if main:
                        tqdm.write(f"stopped by signal {stop} after round {self.round}; checkpoint {path}; "
                                   f"continue with: dpok train --resume {self.out}")
                    raise SystemExit(128 + stop)
                if cfg.checkpoint_every and self.round % cfg.checkpoint_every == 0 and self.round < rounds:
                    self.checkpoint()
        bar.close()
        if self.algorithm.trains:
            self.checkpoint()
        after: dict[str, float] | None = None
        files: dict[str, str] = {}
        if main:
            with self.parts.evaluated_weights():
                after, rows = self.evaluate(shown)
            self._grid(rows, shown, "samples_after.png", after)
            files = save_outputs(self.parts, self.log, before, after, self.round, self.reward_queries,
                                 self.config_format)
        after, files = distributed.broadcast_object((after, files))
        return RunResult(self.out, float(np.mean(list(before.values()))), float(np.mean(list(after.values()))), files,
                         main_process=main)


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT / SIGTERM: finish the current round, checkpoint, exit 130 / 143."""
    def handler(signum: int, frame: object) -> None:
        trainer.stop_signal = signum
        if trainer.is_main:  # a launcher passes the signal to every process: one message
            tqdm.write(f"signal {signum}: stopping after this round (a checkpoint will be written)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def train(cfg: TrainConfig, config_format: str = "yaml") -> RunResult:
    """Run ``cfg`` to the end (see :class:`Trainer`); ``config_format`` of the run folder's ``config.<format>``."""
    trainer = Trainer(cfg, config_format=config_format)
    # a full disk or read-only folder: an error naming the folder, what to free and the checkpoint kept
    with run_folder_writes(trainer.out, "the run's files", lambda: latest_complete(trainer.out)):
        return trainer.run()


def describe_result(result: RunResult) -> str:
    lines = [f"reward before {result.reward_before:.3f} -> after {result.reward_after:.3f}",
             f"outputs in {result.output_dir}/:"]
    lines += [f"  {name:15s} {result.output_dir / rel}" for name, rel in result.files.items()]
    return "\n".join(lines)

