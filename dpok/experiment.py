"""The paper experiment: does online RL beat supervised fine-tuning at equal reward queries, does
the KL term protect image quality, does DDPO-IS beat RWR, does fine-tuning carry over to unseen
prompts? (DPOK, Fan et al. 2023, Sec. 5; DDPO, Black et al. 2023, Sec. 6.)

One *unit* is (task, method, seed): fine-tune with the method for ``rounds x samples_per_round``
reward queries (the same budget for every trained method), then evaluate the result on the task's
seen prompts and, for the multi-prompt task, its unseen prompts, with the measures of
:mod:`dpok.evaluate` (training reward, geometric judge, clean-shape share, Fréchet distance,
diversity, KL to the base). A unit's outcome is ``<output>/units/<task>/<method>/seed<k>/result.json``;
it is written last and atomically, so an interrupted experiment starts again where it stopped
(training inside a unit resumes from its checkpoints too).

The over-optimisation study trains one prompt for a long time with beta = 0 and beta > 0 and
evaluates every ``overopt_eval_every`` rounds, so the reward can be seen rising while the judge or
the image quality falls.

:mod:`dpok.report` turns the outcome folder into ``docs/results.md`` with tables and figures;
nothing in it is typed by hand.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .adapter import DiffusionAdapter
from .algorithms import ALGORITHMS
from .algorithms.base import with_default_beta
from .algorithms.ddpo import DDPOSettings
from .checkpoint import latest_checkpoint
from .config import build_config
from .domains import Domain, domain_for
from .evaluate import SampleSettings, evaluate_prompt, split_means
from .jobs import _save_strip, _write_json, claim, portable_path, release
from .options import from_options, group, option, option_errors, to_options
from .rewards.config import RewardConfig
from .runlog import read_metrics
from .runtime import seed_everything
from .trainer import Trainer


@dataclass(frozen=True)
class Task:
    """Prompts fine-tuned on (``seen``) and prompts only evaluated (``unseen``)."""

    name: str
    title: str
    seen: tuple[str, ...]
    unseen: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """A baseline or fine-tuning algorithm with the settings that differ from the defaults."""

    name: str
    title: str
    algorithm: str | None  # None: the base model, no training
    overrides: tuple[tuple[str, Any], ...] = ()  # what makes the method (DPOK's beta 0, best-of-8)
    untuned: tuple[tuple[str, Any], ...] = ()  # settings taken only with method_settings "defaults"

    @property
    def trains(self) -> bool:
        """Whether the method fine-tunes (its algorithm says; the base model does not)."""
        return self.algorithm is not None and ALGORITHMS.get(self.algorithm).trains


def default_tasks(domain: Domain | None) -> list[Task]:
    """The paper's three single-prompt tasks and its multi-prompt task, on a domain's prompt sets
    ``hard`` (a rare colour pair, a count of four, a two-group composition), ``seen`` and ``unseen``;
    none without a domain that has them."""
    sets = domain.prompt_sets() if domain is not None else {}
    if not {"hard", "seen", "unseen"} <= set(sets):
        return []
    hard = sets["hard"]
    return [
        Task("color", "colour binding on a rare pair", (hard[0],)),
        Task("count", "counting to four", (hard[1],)),
        Task("composition", "two-group composition", (hard[2],)),
        Task("multi", "multi-prompt, with held-out unseen prompts", tuple(sets["seen"]), tuple(sets["unseen"])),
    ]


def default_methods() -> list[Method]:
    return [
        Method("base", "base model", None),
        Method("rejection", "rejection sampling (best of 8)", "rejection-sampling", (("best_of", 8),)),
        Method("sft-kl", "SFT-KL (supervised, KL-regularised)", "sft-kl"),
        Method("rwr", "RWR (reward-weighted regression)", "rwr"),
        Method("ddpo-is", "DDPO-IS", "ddpo-is"),
        Method("dpok", "DPOK (beta = 0.01)", "dpok", (("beta", 0.01),)),
        Method("dpok-no-kl", "DPOK without KL (beta = 0)", "dpok", (("beta", 0.0),)),
        # the newer methods at the settings of their exploration runs (docs/tuning.md): GRPO with its
        # defaults (minibatches of 8 samples, 40 % of the trained steps), DiffusionNFT at the
        # authors' lr (2e-3 collapsed) with deterministic 10-step rollouts
        Method("grpo", "GRPO", "grpo"),
        Method("diffusion-nft", "DiffusionNFT", "diffusion-nft",
               untuned=(("learning_rate", 3e-4), ("lr_schedule", "constant"), ("rollout_steps", 10),
                        ("rollout_eta", 0.0))),
    ]


@dataclass
class ExperimentConfig:
    """Sizes of the experiment. The defaults fit in about two hours on a 2-core CPU (see
    ``benchmarks/README.md`` for the measured timings)."""

    output_dir: str = option("runs/paper_experiment", "outcome folder (units, curves, results)")
    model: str = option("shapeworld", "pipeline folder or hub id (default: the embedded model)")
    reward: RewardConfig = group(RewardConfig)
    tasks: list[str] = option(["color", "count", "composition", "multi"], "tasks to run (default: all)")
    methods: list[str] = option([m.name for m in default_methods()], "methods to run (default: all)")
    seeds: list[int] = option([0, 1, 2], "seeds of every unit")
    rounds: int = option(16, "rounds per trained unit")
    samples_per_round: int = option(16, "samples (reward queries) per round")
    num_steps: int = option(20, "DDIM steps")
    guidance_scale: float = option(5.0, "guidance scale")
    eval_images: int = option(32, "images per prompt in the evaluation of single-prompt tasks")
    multi_eval_images: int = option(8, "images per prompt in the evaluation of the multi-prompt task")
    checkpoint_every: int = option(4, "rounds between a unit's checkpoints")
    overopt_prompt: str = option("two white triangles", "prompt of the over-optimisation study")
    overopt_betas: list[float] = option([0.0, 0.01], "DPOK betas of the over-optimisation study")
    overopt_rounds: int = option(60, "rounds of each over-optimisation run (0: skip the study)")
    overopt_eval_every: int = option(15, "rounds between the over-optimisation run's evaluations")
    overopt_samples_per_round: int = option(32, "samples per round of the over-optimisation runs")
    overopt_eval_images: int = option(32, "images per evaluation of the over-optimisation runs")
    overopt_learning_rate: float = option(1e-3, "constant learning rate of the over-optimisation runs (half the "
                                                "default's peak, held for the whole run to reach over-optimisation)")
    method_settings: Literal["defaults", "tuned"] = option(
        "defaults", "'defaults': every algorithm with the package defaults (DPOK's tuned setting); 'tuned': each "
                    "method with the setting its tuning sweep chose, as the sweep's trials ran it (equal "
                    "optimisation care; the sweep's results in --tuning-dir)")
    tuning_dir: str = option("docs/tuning/data", "kept results of the tuning sweep (method_settings 'tuned')")
    train_overrides: dict[str, Any] = option({}, "extra dpok train settings for every method (flat option names)")
    reuse_units_from: str = option(
        "", "outcome folder of another experiment: a unit that ran there with exactly this unit's settings (its "
            "recorded training settings, the task, seed and evaluation) is copied instead of trained again, and its "
            "result names where it came from ('': train every unit)")
    device: str = option("auto", "'auto', 'cpu' or 'cuda[:N]'")
    # your own prompts instead of the ShapeWorld tasks: one task named "custom" (unseen ones optional)
    custom_seen: list[str] = option([], "your own training prompts (one task named 'custom')")
    custom_unseen: list[str] = option([], "your own held-out prompts of the custom task")

    def domain(self) -> Domain | None:
        """The model's domain, else the reward's (see :mod:`dpok.domains`)."""
        return domain_for(self.model, self.reward.name)

    def all_tasks(self) -> list[Task]:
        """The tasks this experiment can run: the custom one if prompts are given, else the paper's."""
        if self.custom_seen:
            return [Task("custom", "custom prompts", tuple(self.custom_seen), tuple(self.custom_unseen))]
        return default_tasks(self.domain())

    def validate(self) -> None:
        if self.custom_seen and self.tasks != ["custom"]:
            self.tasks = ["custom"]
        known_tasks = {t.name for t in self.all_tasks()}
        known_methods = {m.name for m in default_methods()}
        errors = [f"unknown task {t!r} (valid: {', '.join(sorted(known_tasks))})" for t in self.tasks if t not in known_tasks]
        errors += [f"unknown method {m!r} (valid: {', '.join(sorted(known_methods))})"
                   for m in self.methods if m not in known_methods]
        for name in ("rounds", "samples_per_round", "num_steps", "eval_images", "multi_eval_images",
                     "overopt_eval_every", "overopt_samples_per_round", "checkpoint_every"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.overopt_rounds < 0:
            errors.append(f"overopt_rounds must be >= 0 (got {self.overopt_rounds})")
        if not self.seeds:
            errors.append("give at least one seed")
        errors += option_errors(self) + self.reward.validate()
        if errors:
            raise ValueError("invalid experiment settings:\n  " + "\n  ".join(errors))

    def evaluation_settings(self, task: Task, seed: int) -> dict[str, Any]:
        """What a unit's evaluation depends on besides the model it evaluates (its noise is the seed's)."""
        task = {t.name: t for t in self.all_tasks()}.get(task.name, Task(task.name, "", ()))  # this config's prompts
        return json.loads(json.dumps({
            "task": [task.name, list(task.seen), list(task.unseen)], "seed": seed, "model": self.model,
            "reward": to_options(self.reward), "num_steps": self.num_steps, "guidance_scale": self.guidance_scale,
            "images": self.multi_eval_images if task.unseen else self.eval_images}))

    @property
    def budget(self) -> int:
        """Reward queries every trained method spends."""
        return self.rounds * self.samples_per_round


class Experiment:
    """Runs the units that have no result yet, then the over-optimisation study."""

    def __init__(self, cfg: ExperimentConfig, log: Any = print) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.log = log
        self.tasks = {t.name: t for t in cfg.all_tasks() if t.name in cfg.tasks}
        self.methods = {m.name: m for m in default_methods() if m.name in cfg.methods}
        self._reward = None
        # method_settings "tuned": per algorithm, (chosen candidate, its settings) from the tuning sweep
        self.tuned: dict[str, tuple[str, dict[str, Any]]] = {}
        if cfg.method_settings == "tuned":
            from .tuning import tuned_settings

            self.tuned = tuned_settings(cfg.tuning_dir)
            missing = sorted({m.algorithm for m in self.methods.values() if m.trains} - set(self.tuned))
            if missing:
                raise ValueError(f"method_settings 'tuned': the sweep in {cfg.tuning_dir} chose no setting for "
                                 f"{', '.join(missing)}; tune them first or leave them out of the methods")

    # ------------------------------------------------------------------------------- helpers
    def reward(self):  # noqa: ANN201
        if self._reward is None:
            self._reward = self.cfg.reward.build()
        return self._reward

    def unit_dir(self, task: str, method: str, seed: int) -> Path:
        return self.out / "units" / task / method / f"seed{seed}"

    def method_settings(self, method: Method) -> dict[str, Any]:
        """The training settings that make ``method``: its tuned setting (method_settings 'tuned') or its
        untuned overrides, then the overrides that define it (e.g. DPOK's beta 0)."""
        if not method.trains:
            return dict(method.overrides)
        if self.cfg.method_settings == "tuned":
            return {**self.tuned[method.algorithm][1], **dict(method.overrides)}
        return {**dict(method.untuned), **dict(method.overrides)}

    def train_config(self, task: Task, method: Method, seed: int, run_dir: Path, rounds: int,
                     extra: dict[str, Any] | None = None):  # noqa: ANN201
        settings = self.train_settings(task, method, seed, run_dir, rounds, extra)
        if (run_dir / "config.json").is_file():
            if latest_checkpoint(run_dir) is not None:
                settings["resume"] = str(run_dir)
            else:  # interrupted before its first checkpoint: nothing worth keeping
                shutil.rmtree(run_dir)
        return build_config(None, settings)

    def train_settings(self, task: Task, method: Method, seed: int, run_dir: Path, rounds: int,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The flat ``dpok train`` settings of a unit (no side effects: :meth:`train_config` builds them)."""
        c = self.cfg
        samples = (extra or {}).get("samples_per_round", c.samples_per_round)
        sample_minibatches = ALGORITHMS.get(method.algorithm).sample_minibatches
        # sampling batches that divide the round; DDPO's and GRPO's minibatches (whole samples) are
        # their own automatic ones, which divide the round, unless the method sets them
        fit = {"sample_batch_size": math.gcd(32, samples)}
        reward = {k: v for k, v in to_options(c.reward).items() if v}
        settings = {"model": c.model, **reward, "prompt": list(task.seen), "algorithm": method.algorithm,
                    "rounds": rounds, "samples_per_round": samples, "seed": seed, **fit,
                    "num_steps": c.num_steps, "guidance_scale": c.guidance_scale, "output_dir": str(run_dir),
                    "eval_images": 1, "checkpoint_every": c.checkpoint_every, "keep_checkpoints": 1, "device": c.device,
                    **self.method_settings(method), **c.train_overrides, **(extra or {})}
        if sample_minibatches and settings.get("minibatch_size"):  # a method's own, fitted to a smaller round
            settings["minibatch_size"] = math.gcd(settings["minibatch_size"], samples)
        return settings

    # ------------------------------------------------------------------------ reused units
    def reusable_unit(self, task: Task, method: Method, seed: int) -> Path | None:
        """The unit folder in ``reuse_units_from`` that ran exactly as this unit would, if there is one:
        the same evaluation and, for a method that runs the trainer, the training settings its run
        folder recorded (``config.json``; a setting added since then had its old meaning, as on resume)
        equal to this unit's, its own output folder aside. Results kept without their run folder are not
        reused: their recorded settings are gone, and today's defaults may not be what they ran with."""
        from .cli import SETTINGS_BEFORE_THEY_EXISTED

        if not self.cfg.reuse_units_from:
            return None
        source_dir = Path(self.cfg.reuse_units_from)
        folder = source_dir / "units" / task.name / method.name / f"seed{seed}"
        meta = source_dir / "experiment.json"
        if not (folder / "result.json").is_file() or not meta.is_file():
            return None
        kept = json.loads(meta.read_text())["config"]
        source = from_options(ExperimentConfig, {k: v for k, v in kept.items() if k in to_options(self.cfg)})
        if source.evaluation_settings(task, seed) != self.cfg.evaluation_settings(task, seed):
            return None
        if method.algorithm is None:
            return folder
        recorded = folder / "run" / "config.json"
        if not recorded.is_file():
            return None
        rounds = self.cfg.rounds if method.trains else 1
        ours = self.train_settings(task, method, seed, folder / "run", rounds)
        theirs = {**SETTINGS_BEFORE_THEY_EXISTED, **json.loads(recorded.read_text())}
        # settings of a group the algorithm never reads (DDPO's, for DPOK) do not change the run
        unread = set() if ALGORITHMS.get(method.algorithm).reads_ddpo_settings else set(to_options(DDPOSettings()))
        # --beta -1 as the value it stands for, which is what a run folder records
        plain = lambda d: {k: v for k, v in to_options(with_default_beta(build_config(None, d))).items()  # noqa: E731
                           if k not in {"output_dir", "resume", *unread}}
        return folder if plain(ours) == plain(theirs) else None

    def reuse_unit(self, task: Task, method: Method, seed: int, source: Path) -> dict[str, Any]:
        """Copy a unit's result and image strips from ``source`` (see :meth:`reusable_unit`)."""
        folder = self.unit_dir(task.name, method.name, seed)
        if (source / "images").is_dir():
            shutil.copytree(source / "images", folder / "images", dirs_exist_ok=True)
        result = json.loads((source / "result.json").read_text())
        result["reused_from"] = {"experiment": portable_path(str(source.parent.parent.parent.parent)),
                                 "method_settings": result.get("method_settings", "defaults")}
        result["method_settings"] = self.cfg.method_settings
        if method.trains and self.cfg.method_settings == "tuned":
            result["tuned_candidate"] = self.tuned[method.algorithm][0]
        _write_json(folder / "result.json", result)
        return result

    def evaluate(self, adapter, task: Task, seed: int, folder: Path, generate=None) -> dict[str, Any]:  # noqa: ANN001
        """Every measure on the seen and unseen prompts; the same evaluation noise for every method."""
        c = self.cfg
        n = c.multi_eval_images if task.unseen else c.eval_images
        settings = SampleSettings(n, c.num_steps, c.guidance_scale, 1.0)
        domain = c.domain()
        splits: dict[str, Any] = {}
        for split, prompts in (("seen", task.seen), ("unseen", task.unseen)):
            rows = {}
            for i, prompt in enumerate(prompts):
                eval_seed = 900_000 + 1000 * seed + i
                images = None
                if generate is not None:
                    images = generate([prompt] * n, torch.Generator().manual_seed(eval_seed))
                rows[prompt], images = evaluate_prompt(adapter, self.reward(), prompt, settings, eval_seed, domain,
                                                       images)
                _save_strip(images, folder / "images" / f"{split}_{i:02d}.png")
            if rows:
                splits[split] = {"prompts": rows, **split_means(rows)}
        return splits

    # --------------------------------------------------------------------------------- units
    def run_unit(self, task: Task, method: Method, seed: int) -> dict[str, Any]:
        folder = self.unit_dir(task.name, method.name, seed)
        t0 = time.perf_counter()
        curve: list[dict[str, float]] = []
        queries, per_image = 0, 1
        if method.algorithm is None:
            seed_everything(seed)
            adapter = DiffusionAdapter.load(self.cfg.model, "", self.cfg.device)
            splits = self.evaluate(adapter, task, seed, folder)
        elif not method.trains:  # rejection sampling: best-of-n of the base model, nothing trained
            cfg = self.train_config(task, method, seed, folder / "run", rounds=1)
            trainer = Trainer(cfg)
            splits = self.evaluate(trainer.adapter, task, seed, folder, generate=trainer.algorithm.generate)
            per_image = trainer.algorithm.reward_queries_per_image()
        else:
            cfg = self.train_config(task, method, seed, folder / "run", rounds=self.cfg.rounds)
            trainer = Trainer(cfg)
            trainer.run()
            queries = trainer.reward_queries
            curve = [{"queries": r["charts/reward_queries"], "reward": r["reward/mean"], "kl": r.get("kl/rollout", 0.0)}
                     for r in read_metrics(folder / "run" / "metrics.jsonl")]
            splits = self.evaluate(trainer.adapter, task, seed, folder)
        result = {"task": task.name, "method": method.name, "seed": seed, "train_queries": queries,
                  "queries_per_image": per_image, "curve": curve, "splits": splits,
                  "wall_s": time.perf_counter() - t0, "method_settings": self.cfg.method_settings}
        if method.trains and self.cfg.method_settings == "tuned":
            result["tuned_candidate"] = self.tuned[method.algorithm][0]
        _write_json(folder / "result.json", result)
        return result

    def pending_units(self) -> list[tuple[Task, Method, int]]:
        """Seed-major order, so a partial experiment still covers every method and task."""
        todo = []
        for seed in self.cfg.seeds:
            for task in self.tasks.values():
                for method in self.methods.values():
                    if not (self.unit_dir(task.name, method.name, seed) / "result.json").is_file():
                        todo.append((task, method, seed))
        return todo

    # ---------------------------------------------------------------------- over-optimisation
    def overopt_dir(self, beta: float) -> Path:
        return self.out / "overopt" / f"beta{beta:g}"

    def overopt_config(self, beta: float, rounds: int):  # noqa: ANN201
        """The training settings of the over-optimisation run with KL weight ``beta``, up to ``rounds``."""
        c = self.cfg
        task = Task("overopt", "over-optimisation", (c.overopt_prompt,))
        method = Method(f"dpok-beta{beta:g}", f"DPOK beta = {beta:g}", "dpok", (("beta", beta),))
        # a constant step: each segment resumes with more rounds, and a decaying schedule would
        # restart its decay over the longer run at every resume
        extra = {"learning_rate": c.overopt_learning_rate, "lr_schedule": "constant",
                 "checkpoint_every": c.overopt_eval_every, "samples_per_round": c.overopt_samples_per_round}
        return self.train_config(task, method, 0, self.overopt_dir(beta) / "run", rounds=rounds, extra=extra)

    def run_overopt(self, beta: float) -> None:
        """Train one prompt for ``overopt_rounds`` with KL weight ``beta``, evaluating every
        ``overopt_eval_every`` rounds (round 0 is the base model). Each segment resumes the last."""
        c = self.cfg
        folder = self.overopt_dir(beta)
        points_path = folder / "points.jsonl"
        done = {json.loads(line)["round"] for line in points_path.read_text().splitlines()} if points_path.is_file() else set()
        settings = SampleSettings(c.overopt_eval_images, c.num_steps, c.guidance_scale, 1.0)
        domain = c.domain()
        for end in range(0, c.overopt_rounds + 1, c.overopt_eval_every):
            if end in done:
                continue
            if end == 0:
                adapter = DiffusionAdapter.load(c.model, "", c.device)
            else:
                trainer = Trainer(self.overopt_config(beta, end))
                trainer.run()
                adapter = trainer.adapter
            row, images = evaluate_prompt(adapter, self.reward(), c.overopt_prompt, settings, 777_000, domain)
            _save_strip(images, folder / "images" / f"round{end:04d}.png")
            train = read_metrics(folder / "run" / "metrics.jsonl") if end else []
            point = {"round": end, "queries": end * c.overopt_samples_per_round, **row,
                     "train_reward_last": float(np.mean([r["reward/mean"] for r in train[-c.overopt_eval_every:]]))
                     if train else None}
            with open(points_path, "a") as f:
                f.write(json.dumps(point) + "\n")
            self.log(f"over-optimisation beta={beta:g} round {end}: reward {row['reward_mean']:.3f}"
                     + (f" judge {row['judge_aligned']:.3f} FD {row['frechet']:.3f}" if "frechet" in row else "")
                     + f" KL {row['kl_to_base']:.3f}")

    # ----------------------------------------------------------------------------------- run
    def jobs(self) -> list[tuple[str, Path, Any]]:
        """Everything to run, in order: seed 0's units, the over-optimisation runs, the other seeds'
        units, so that a partial experiment already covers every method, task and question."""
        jobs: list[tuple[str, Path, Any]] = []
        for k, seed in enumerate(self.cfg.seeds):
            for task in self.tasks.values():
                for method in self.methods.values():
                    jobs.append(("unit", self.unit_dir(task.name, method.name, seed), (task, method, seed)))
            if k == 0 and self.cfg.overopt_rounds:
                jobs += [("overopt", self.overopt_dir(beta), beta) for beta in self.cfg.overopt_betas]
        return jobs

    def is_done(self, kind: str, folder: Path) -> bool:
        if kind == "unit":
            return (folder / "result.json").is_file()
        points = folder / "points.jsonl"
        if not points.is_file():
            return False
        rounds = {json.loads(line)["round"] for line in points.read_text().splitlines() if line.strip()}
        return set(range(0, self.cfg.overopt_rounds + 1, self.cfg.overopt_eval_every)) <= rounds

    def write_meta(self) -> None:
        path = self.out / "experiment.json"
        if path.is_file():  # one folder, one way of setting the methods: its units are compared with each other
            before = json.loads(path.read_text())["config"].get("method_settings", "defaults")
            if before != self.cfg.method_settings:
                raise ValueError(f"{self.out} holds units trained with method_settings {before!r}, not "
                                 f"{self.cfg.method_settings!r}; give another output_dir (its results are kept)")
        config = {**to_options(self.cfg), "output_dir": portable_path(self.cfg.output_dir)}
        _write_json(self.out / "experiment.json", {"config": config, "budget": self.cfg.budget})

    def run(self) -> int:
        """Run every job not done and not claimed by another live worker; several workers may share
        one output folder (each claims a job with an exclusive lock file). Returns jobs run here."""
        self.write_meta()
        jobs = self.jobs()
        todo = [j for j in jobs if not self.is_done(j[0], j[1])]
        self.log(f"{len(todo)} of {len(jobs)} job(s) left ({self.cfg.budget} reward queries per trained method) "
                 f"in {self.out}")
        ran = 0
        for kind, folder, arg in todo:
            if self.is_done(kind, folder) or not claim(folder):
                continue
            try:
                t0 = time.perf_counter()
                if kind == "overopt":
                    self.run_overopt(arg)
                    continue
                task, method, seed = arg
                source = self.reusable_unit(task, method, seed)
                result = self.reuse_unit(task, method, seed, source) if source else self.run_unit(task, method, seed)
                seen = result["splits"]["seen"]
                judge = f" judge {seen['judge_aligned_mean']:.3f}" if "judge_aligned_mean" in seen else ""
                how = f"copied from {source}" if source else f"{time.perf_counter() - t0:.0f} s"
                self.log(f"{task.name} {method.name} seed {seed}: reward {seen['reward_mean']:.3f}{judge} ({how})")
            finally:
                release(folder)
                ran += 1
        return ran

    def finished(self) -> bool:
        return all(self.is_done(kind, folder) for kind, folder, _ in self.jobs())


def load_results(folder: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """(experiment config, unit results, over-optimisation points by beta) of an outcome folder."""
    folder = Path(folder)
    meta_path = folder / "experiment.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{folder} holds no experiment.json: run benchmarks/paper_experiment.py first")
    meta = json.loads(meta_path.read_text())
    units = [json.loads(p.read_text()) for p in sorted(folder.glob("units/*/*/seed*/result.json"))]
    overopt = {}
    for path in sorted(folder.glob("overopt/beta*/points.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        overopt[path.parent.name.removeprefix("beta")] = sorted({r["round"]: r for r in rows}.values(),
                                                               key=lambda r: r["round"])
    return meta, units, overopt
