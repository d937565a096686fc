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
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed, periodic_eval
from .adapter import DiffusionAdapter
from .algorithms import ALGORITHMS, Algorithm, AlgorithmContext, Rollout
from .checkpoint import checkpoint_path, latest_checkpoint, latest_complete, write_checkpoint
from .config import TrainConfig
from .configfile import write_run_config
from .core import lr_factor
from .domains import Domain, model_domain, reward_domain
from .ema import PolicyEMA
from .export import export_kohya, write_model_card
from .prompts import FunctionPromptSampler, PromptFunction, PromptSampler, prompt_metadata, resolve_prompts
from .rewards import Reward, RewardError, RewardOutput
from .rewards.base import PromptMetadataReward
from .runlog import RunLog, plot_curves, read_metrics
from .runtime import seed_everything, select_device
from .sampling import SampleSettings, Trajectory, sample_in_batches, trajectory_kl
from .utils.diskwrite import run_folder_writes, write_text_atomic
from .utils.state_io import CheckpointError, rng_state, set_rng_state
from .viz import save_prompt_grid

GRID_PROMPTS = 4  # prompts shown in the before/after grids
GRID_IMAGES = 8  # images per prompt in the grids


class TrainingDiverged(RuntimeError):
    """Too many skipped updates in a row."""


@dataclass
class RunResult:
    output_dir: Path
    reward_before: float
    reward_after: float
    files: dict[str, str] = field(default_factory=dict)
    main_process: bool = True  # False on the other processes of a multi-process run (they print nothing)


def prepare_prompts(cfg: TrainConfig, domain: Domain | None, defaults: tuple[str, ...] = ()) -> list[str]:
    """Training prompts: the ones given (checked by ``domain``), else ``defaults``, the model's
    domain's (on the embedded model ``two white triangles``)."""
    if not (cfg.prompt or cfg.prompt_file or cfg.prompt_set):
        if not defaults:
            raise ValueError("give training prompts with --prompt, --prompt-file or --prompt-set")
        return list(defaults)
    return resolve_prompts(cfg.prompt or None, cfg.prompt_file or None, cfg.prompt_set or None, domain)


def default_output_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"


class Trainer:
    """Owns the model, reward, algorithm, optimizer and the run folder for one run."""

    def __init__(self, cfg: TrainConfig, config_format: str = "yaml", *, pipeline: Any = None,
                 reward: Reward | None = None, prompt_fn: PromptFunction | None = None) -> None:
        """``config_format``: ``yaml`` or ``toml``, the format of the resolved ``config.<format>``
        written into the run folder beside ``config.json`` (the format of the run's ``--config`` file).

        From Python (see :func:`dpok.api.train`): ``pipeline``, a diffusers pipeline object to train
        instead of loading ``cfg.model`` (changed in place); ``reward``, a :class:`~dpok.rewards.Reward`
        instead of ``cfg.reward``; ``prompt_fn``, ``fn(rng) -> prompt or (prompt, metadata)`` drawing
        the training prompts instead of ``cfg.prompt`` / ``prompt_file`` / ``prompt_set``."""
        if config_format not in ("yaml", "toml"):
            raise ValueError(f"config_format must be 'yaml' or 'toml' (got {config_format!r})")
        self.config_format = config_format
        state = distributed.init_processes(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
        self.rank, self.num_processes = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        cfg.validate(num_processes=self.num_processes)
        auto = [n for n in ("sample_batch_size", "minibatch_size") if getattr(cfg, n) == 0]
        cfg = cfg.resolved(self.num_processes)
        if auto and self.is_main:
            tqdm.write("batch sizes (auto): " + ", ".join(f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n in auto))
        self.cfg = cfg
        # prompt -> metadata (a .jsonl prompt file's fields, or what prompt_fn returns), for the rewards that take it
        # the model's domain gives default prompts; a domain reward's checks the prompts on any model
        own = model_domain(cfg.model)
        self.domain = own or reward_domain(cfg.reward.name)
        self.prompt_metadata: dict[str, dict[str, Any]] = (prompt_metadata(cfg.prompt_file, self.domain)
                                                           if cfg.prompt_file else {})
        self.prompt_fn = prompt_fn
        if prompt_fn is None:
            self.prompts = prepare_prompts(cfg, self.domain, own.default_prompts if own else ())
        else:  # the fixed prompts of the grids and evaluations, drawn once from their own stream
            self.prompts = FunctionPromptSampler(prompt_fn, cfg.seed, self.prompt_metadata).preview(GRID_PROMPTS)
        self.eval_unseen = (resolve_prompts(cfg.eval_prompt or None, None, cfg.eval_prompt_set or None, self.domain)
                            if cfg.eval_prompt or cfg.eval_prompt_set else [])
        self.device = select_device(cfg.device)
        if state is not None and self.device.type == "cuda":
            self.device = state.device  # one GPU per process: cuda:<local rank>
        self.reward = reward.to(self.device) if reward is not None else cfg.reward.build(self.device)
        if self.reward.uses_metadata:  # handed each prompt's metadata wherever it is called
            self.reward = PromptMetadataReward(self.reward, self.prompt_metadata)
        self.reward.validate_prompts(self.prompts + self.eval_unseen)
        self.out = Path(cfg.resume or cfg.output_dir) if (cfg.resume or cfg.output_dir) else default_output_dir(cfg)
        if not cfg.resume and (self.out / "config.json").exists():
            raise ValueError(f"--output-dir {self.out} already holds a run (config.json); continue it with "
                             f"--resume {self.out} or choose another --output-dir (nothing was changed)")
        # every process has checked the folder before the main one writes config.json into it
        distributed.barrier()
        # the same seed everywhere first: every process builds identical LoRA / value-function weights
        seed_everything(cfg.seed)
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        if dtype != torch.float32 and self.device.type == "cpu":
            raise ValueError("--mixed-precision fp16/bf16 needs a GPU; use --mixed-precision no on the CPU")
        self.adapter = (DiffusionAdapter.from_pipeline(pipeline, self.device, dtype) if pipeline is not None
                        else DiffusionAdapter.from_pretrained(cfg.model, self.device, dtype))
        if cfg.finetune == "lora":
            self.adapter.add_lora(cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets.split(",")))
        else:
            self.adapter.enable_full_finetuning()
        if cfg.gradient_checkpointing:
            self.adapter.unet.enable_gradient_checkpointing()
        params = self.adapter.trainable_parameters()
        self.optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        # the EMA of the trainable weights, stepped after every optimizer step (--ema-decay)
        self.ema = PolicyEMA(params, cfg.ema_decay, self.optimizer) if cfg.ema_decay else None
        # each process its own prompt and noise streams (process 0: the run's seed, as with one process)
        seed = distributed.rank_seed(cfg.seed, self.rank)
        self.generator = torch.Generator().manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        ctx = AlgorithmContext(cfg, self.adapter, self.optimizer, self.rng, self.generator, self.reward)
        self.algorithm: Algorithm = ALGORITHMS.create(cfg.algorithm, ctx)
        self.sampler = (PromptSampler(self.prompts, seed) if prompt_fn is None
                        else FunctionPromptSampler(prompt_fn, seed, self.prompt_metadata))
        if self.rank > 0:
            seed_everything(seed)  # the global RNGs too, now that the shared weights are built
        distributed.broadcast_parameters(self._replicated_parameters())
        self.out.mkdir(parents=True, exist_ok=True)  # only now: a model that fails to load leaves no empty run folder
        self.round = 0
        self.reward_queries = 0
        self.before: dict[str, float] | None = None
        self.stop_signal: int | None = None
        self.bad_rounds = 0
        self.update_skipped = False
        if cfg.resume:
            self._resume()
        self.log: RunLog | None = RunLog(self.out, cfg.report_to, cfg.to_dict()) if self.is_main else None

    def _replicated_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters every process holds the same copy of: the policy's trainable ones and the algorithm's."""
        return self.adapter.trainable_parameters() + self.algorithm.replicated_parameters()

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        trainable = {n: p.detach().cpu() for n, p in self.adapter.unet.named_parameters() if p.requires_grad}
        return {
            "round": self.round, "reward_queries": self.reward_queries, "before": self.before,
            "trainable": trainable, "optimizer": self.optimizer.state_dict(),
            "algorithm": self.algorithm.state_dict(), "prompt_sampler": self.sampler.state_dict(),
            "rng": rng_state(self.rng), "generator": self.generator.get_state(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
        }

    # what differs between the processes of a run; the rest (weights, optimizer, counters) is the same on all
    PER_PROCESS = ("algorithm", "prompt_sampler", "rng", "generator")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, or a checkpoint of a multi-process run: there each process
        takes its own entry of ``state["processes"]`` (the main process's is the top level)."""
        saved = int(state.get("num_processes", 1))
        if saved != self.num_processes:
            raise CheckpointError(f"the checkpoint was written by a run of {saved} process(es); resume it with "
                                  f"{saved} (this run has {self.num_processes}) so that it continues identically")
        mine = state if self.rank == 0 else state["processes"][self.rank]
        params = dict(self.adapter.unet.named_parameters())
        missing = [n for n in state["trainable"] if n not in params]
        if missing:
            raise CheckpointError(f"checkpoint weights {missing[:3]} do not match this model's trainable parameters; "
                                  "resume with the same --model, --finetune and LoRA settings")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if "ema" not in state:
                raise CheckpointError("the checkpoint holds no EMA weights; it was written without --ema-decay")
            self.ema.load_state_dict(state["ema"])
        self.algorithm.load_state_dict(mine["algorithm"])
        self.sampler.load_state_dict(mine["prompt_sampler"])
        set_rng_state(mine["rng"], self.rng)
        self.generator.set_state(mine["generator"])
        self.round, self.reward_queries, self.before = int(state["round"]), int(state["reward_queries"]), state["before"]

    def checkpoint(self) -> Path:
        """Write a checkpoint (main process); with several processes every one must call this.

        A multi-process checkpoint adds ``num_processes`` and ``processes``: for each process
        r >= 1 its own algorithm state (replay buffer, SFT data), prompt sampler, RNG and
        generator states, gathered to the main process. Each process's digest of the replicated
        weights is compared first: a mismatch means the processes diverged, and no checkpoint
        is written.
        """
        state = self.state_dict()
        if self.num_processes == 1:
            return write_checkpoint(self.out, self.round, state, self.cfg.keep_checkpoints)
        own = {k: state[k] for k in self.PER_PROCESS}
        own["weights_digest"] = distributed.parameters_digest(self._replicated_parameters())
        gathered = distributed.gather_objects(distributed.to_cpu(own))
        error = None
        if gathered is not None:
            digests = [g["weights_digest"] for g in gathered]
            if len(set(digests)) > 1:
                error = (f"the processes' weights differ after round {self.round} (digests {digests}): they must "
                         "stay identical; no checkpoint was written")
            else:
                state.update(num_processes=self.num_processes, weights_digest=digests[0],
                             processes={r: gathered[r] for r in range(1, self.num_processes)})
                write_checkpoint(self.out, self.round, state, self.cfg.keep_checkpoints)
        error = distributed.broadcast_object(error)  # also: nobody goes on before the checkpoint exists
        if error:
            raise TrainingDiverged(error)
        return checkpoint_path(self.out, self.round)

    def _resume(self) -> None:
        found = latest_checkpoint(self.out)
        if found is None:
            # stopped before its first checkpoint: this run's start is what a fresh run does (same seed)
            if self.is_main:
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
                tqdm.write(f"{self.out} has no complete checkpoint yet: running it again from its start")
            distributed.barrier()
            return
        path, state = found
        self.load_state_dict(state)
        if self.is_main:
            # rounds logged after the checkpoint will be run again: drop their lines
            rows = [r for r in read_metrics(self.out / "metrics.jsonl") if r["round"] <= self.round]
            (self.out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            tqdm.write(f"resumed {self.out} from {path.name} (round {self.round})")
        distributed.barrier()  # every process has read the checkpoint before the main one may replace it

    # ------------------------------------------------------------------------------- phases
    def sample(self, prompts: list[str]) -> Trajectory:
        cfg = self.cfg
        steps, eta = self.algorithm.rollout_sampler()
        with self.algorithm.sampling_policy():
            return sample_in_batches(self.adapter, prompts, cfg.sample_batch_size, steps, eta,
                                     cfg.guidance_scale, self.generator,
                                     reference=self.algorithm.samples_from_reference,
                                     logprob_reduce=cfg.logprob_reduce, with_log_probs=eta > 0)

    def score(self, traj: Trajectory, attempts: int = 3) -> RewardOutput:
        """Score a round's samples. If the reward fails (e.g. its server is down after its own
        retries), the samples are kept and scored again, never given a made-up score."""
        for attempt in range(1, attempts + 1):
            try:
                out = self.reward(traj.images, traj.prompts)
                break
            except RewardError as e:
                if attempt == attempts:
                    raise RewardError(f"round {self.round + 1}: scoring failed {attempts} times, last: {e}. The "
                                      f"run stops here; its last checkpoint is kept (continue with --resume)") from e
                tqdm.write(f"reward failed ({e}); scoring the same {len(traj.prompts)} samples again")
                time.sleep(2.0 * attempt)
        self.reward_queries += distributed.all_sum(len(traj.prompts))  # the run's total, over processes
        return out

    def rollout_kl(self, traj: Trajectory, max_samples: int = 4) -> float:
        """Sum over steps of the closed-form KL_t to the pretrained policy, summed over latent
        elements (nats) and averaged over (at most ``max_samples``) trajectories of this round,
        with the policy that sampled them: the DPOK bound on KL(p_theta(x_0|z) || p_pre(x_0|z))."""
        cfg, n = self.cfg, min(max_samples, traj.batch_size)
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
        traj = self.sample(self.sampler.sample_groups(cfg.samples_per_round // self.num_processes,
                                                      cfg.group_size(self.num_processes)))
        t1 = time.perf_counter()
        scored = self.score(traj)
        t2 = time.perf_counter()
        # before the update: the KL of the policy that sampled these trajectories
        rollout_kl = self.rollout_kl(traj)
        lr = cfg.learning_rate * lr_factor(self.round, cfg.rounds, cfg.lr_schedule, cfg.lr_warmup_rounds)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.adapter.train(True)
        update = self.algorithm.update(Rollout(traj, scored.scores, scored.valid))
        self.adapter.train(False)
        t3 = time.perf_counter()
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
            "time/sample_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2,
            "charts/reward_queries": float(self.reward_queries),
        })
        # any process's skipped update makes the round a bad one on every process
        self.update_skipped = bool(distributed.all_max(int(update.skipped)))
        # the same dict on every process, so that every process takes the same stop decisions
        return distributed.merge_metrics(metrics)

    # ---------------------------------------------------------------------------- evaluation
    def evaluate(self, prompts: list[str], base: bool = False) -> tuple[dict[str, float], list[np.ndarray]]:
        """Mean reward per prompt over ``eval_images`` fixed-seed samples (same seeds every call).

        ``base=True`` samples the pretrained policy; otherwise the method's own output (for
        rejection sampling, the best of ``best_of``)."""
        cfg, per_prompt, rows = self.cfg, {}, []
        for i, prompt in enumerate(prompts):
            gen = torch.Generator().manual_seed(10_000 + cfg.seed * 100 + i)
            batch = [prompt] * cfg.eval_images
            if base:
                images = sample_in_batches(self.adapter, batch, cfg.sample_batch_size, cfg.num_steps, cfg.eta,
                                           cfg.guidance_scale, gen, reference=True).images
            else:
                images = self.algorithm.generate(batch, gen)
            out = self.reward(images, [prompt] * len(images))
            per_prompt[prompt] = float(out.scores[out.valid].mean()) if out.valid.any() else float("nan")
            rows.append(images[:GRID_IMAGES].permute(0, 2, 3, 1).cpu().numpy())
        return per_prompt, rows

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

    def evaluated_weights(self) -> contextlib.AbstractContextManager[None]:
        """The weights evaluations use: the EMA ones with --ema-decay (within the block), else the raw ones."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def _eval_due(self, rounds: int) -> bool:
        """Whether ``--eval-every`` evaluates after the round just finished (every N rounds and the last)."""
        every = self.cfg.eval_every
        return bool(every) and self.algorithm.trains and (self.round % every == 0 or self.round == rounds)

    def periodic_eval(self) -> dict[str, float] | None:
        """The ``--eval-every`` evaluation of the current policy (main process; the others wait):
        ``eval/*`` means to ``eval.jsonl``, a grid to ``eval/round-N.png``, ``eval_curves.png``."""
        metrics = None
        if self.is_main:
            plan = periodic_eval.make_plan(self.prompts, self.eval_unseen, self.cfg.eval_every_images,
                                           self.cfg.num_steps, self.cfg.guidance_scale, self.cfg.eta, self.cfg.seed,
                                           self.domain, self.cfg.sample_batch_size)
            with self.evaluated_weights():
                metrics, rows, labels = periodic_eval.evaluate_policy(self.adapter, self.reward, plan)
            grid = periodic_eval.record(self.out, self.round, metrics, rows, labels)
            if self.log is not None:
                self.log.log_scalars(metrics, self.round)
                self._log_grid("eval/grid", grid)
            shown = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items()
                              if k.endswith(("reward_mean", "judge_aligned")))
            tqdm.write(f"eval after round {self.round}: {shown}")
        distributed.barrier()
        return metrics

    def _grid(self, rows: list[np.ndarray], prompts: list[str], name: str, scores: dict[str, float]) -> Path:
        labels = [f"{p}  (reward {scores[p]:.3f})" for p in prompts]
        path = save_prompt_grid(rows, labels, self.out / name)
        self._log_grid(f"samples/{Path(name).stem.removeprefix('samples_')}", path)
        return path

    def _log_grid(self, key: str, path: Path) -> None:
        """A saved grid (PNG) to the trackers, at the current round."""
        if self.log is not None:
            from PIL import Image

            with Image.open(path) as image:
                self.log.log_image(key, np.asarray(image.convert("RGB")), self.round)

    # ---------------------------------------------------------------------------------- run
    def run(self) -> RunResult:
        cfg, main = self.cfg, self.is_main
        if main and not (cfg.resume and (self.out / f"config.{self.config_format}").exists()):
            # config.yaml first: config.json marks a folder as holding a run, so a kill between the
            # two leaves no run without its config file (a resume writes a missing one again)
            write_run_config(cfg, self.out, self.config_format)
        if main and not cfg.resume:
            write_text_atomic(self.out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
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
            with self.evaluated_weights():
                after, rows = self.evaluate(shown)
            self._grid(rows, shown, "samples_after.png", after)
            files = self._save_outputs(before, after)
        after, files = distributed.broadcast_object((after, files))
        return RunResult(self.out, float(np.mean(list(before.values()))), float(np.mean(list(after.values()))), files,
                         main_process=main)

    def _save_outputs(self, before: dict[str, float], after: dict[str, float]) -> dict[str, str]:
        files = {"config": "config.json", "config_file": f"config.{self.config_format}", "metrics": "metrics.jsonl",
                 "tensorboard": "tensorboard/",
                 "samples_before": "samples_before.png", "samples_after": "samples_after.png"}
        lora = self.algorithm.trains and self.cfg.finetune == "lora"
        if lora:
            self.adapter.save_lora(self.out / "lora")
            files["lora"] = "lora/pytorch_lora_weights.safetensors"
            if self.cfg.kohya_lora:
                files["lora_kohya"] = str(export_kohya(self.out).relative_to(self.out))
            files["model_card"] = "lora/README.md"
        elif self.algorithm.trains:
            self.adapter.unet.save_pretrained(self.out / "unet")
            files["unet"] = "unet/"
        if self.ema is not None and self.algorithm.trains:  # the EMA weights beside the raw ones
            with self.ema.applied():
                if lora:
                    self.adapter.save_lora(self.out / "lora_ema")
                    files["lora_ema"] = "lora_ema/pytorch_lora_weights.safetensors"
                    if self.cfg.kohya_lora:
                        files["lora_ema_kohya"] = str(export_kohya(self.out / "lora_ema").relative_to(self.out))
                else:
                    self.adapter.unet.save_pretrained(self.out / "unet_ema")
                    files["unet_ema"] = "unet_ema/"
        if plot_curves(self.log.path, self.out / "curves.png"):
            files["curves"] = "curves.png"
        evals = read_metrics(self.out / "eval.jsonl")
        if evals:
            files.update({"eval": "eval.jsonl", "eval_grids": "eval/"})
            if periodic_eval.plot_eval_curves(self.out / "eval.jsonl", self.out / "eval_curves.png"):
                files["eval_curves"] = "eval_curves.png"
        summary = {"reward_before": before, "reward_after": after,
                   "reward_before_mean": float(np.mean(list(before.values()))),
                   "reward_after_mean": float(np.mean(list(after.values()))),
                   "eval_images_per_prompt": self.cfg.eval_images, "rounds": self.round,
                   "reward_queries": self.reward_queries,
                   "reward_queries_per_eval_image": self.algorithm.reward_queries_per_image(),
                   "eval_last": evals[-1] if evals else None,
                   "evaluated_weights": "ema" if self.ema is not None else "raw", "files": files}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        files["summary"] = "summary.json"
        if lora:
            write_model_card(self.out)
        if self.log is not None:
            self.log.close()
        return files


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

