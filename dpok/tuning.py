"""The tuning sweep behind the defaults: every method gets the same number of candidate settings,
each trained at the same budget on the same prompts and seeds, judged by the same measures.

A *trial* is (method, candidate, prompt, seed): fine-tune from the defaults plus the candidate's
settings, then evaluate the result on ``eval_images`` fixed-noise samples of the prompt with the
geometric judge (independent of the reward), the clean-shape share, the Fréchet distance and the
reward. Its outcome is ``<output>/trials/<method>/<candidate>/<prompt-slug>/seed<k>/result.json``,
written last and atomically: an interrupted sweep resumes where it stopped (training inside a
trial resumes from its checkpoints), and several workers can share one folder (lock files, as the
paper experiment).

The *screening* (stage ``trials``) ranks a method's candidates by their mean judge over the tuning
prompts (ties: the reward). A judge on 32 images has a standard error up to 0.09, too coarse to
separate good candidates, so the *confirmation* stage trains each method's ``confirm_top`` best
candidates again on other prompts and seeds and judges them on ``confirm_images`` images; the better
there is the method's tuned setting (the screening's best until its confirmation is finished). The
*validation* stage trains the tuned settings on prompts that were not tuned on. :func:`write_report`
writes ``docs/tuning.md`` from the result files only.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .algorithms.base import largest_divisor_at_most
from .checkpoint import latest_checkpoint
from .config import TrainConfig, build_config
from .evaluate import SampleSettings, evaluate_prompt, slug
from .jobs import _save_strip, _write_json, claim, portable_path, release
from .rewards.config import RewardConfig
from .runlog import read_metrics
from .trainer import Trainer
from .utils.machine import cpu_description

# 2: a frozen base keeps --minibatch-size 0 as "the algorithm's own shape" (1: "the whole round")
BASE_VERSION = 2

REFERENCES = ("base", "rejection-sampling")  # evaluated without training, on every prompt


ROUND_PHASES = ("time/sample_s", "time/kl_s", "time/reward_s", "time/update_s")  # a round's time, phase by phase

# what a trial's settings say about the run rather than the method (model, reward, prompts, budget, sampler
# of the evaluation, outputs, devices): left out of a tuned setting that another run takes over
RUN_SETTINGS = frozenset({
    "model", "reward", "alignment_model", "reward_model", "reward_head", "reward_processor", "reward_url",
    "reward_token", "reward_ca_file", "prompt", "prompt_file", "prompt_set", "eval_prompt_set", "eval_prompt",
    "algorithm", "output_dir", "seed", "device", "mixed_precision", "rounds", "samples_per_round",
    "sample_batch_size", "num_steps", "guidance_scale", "eval_images", "checkpoint_every", "keep_checkpoints",
    "resume", "report_to", "eval_every", "eval_every_images", "kohya_lora", "max_bad_rounds", "compile",
    "channels_last", "autocast", "reward_overlap", "gradient_checkpointing"})


@dataclass(frozen=True)
class Candidate:
    """One setting of a method: its name and the TrainConfig values that differ from the defaults."""

    name: str
    overrides: tuple[tuple[str, Any], ...] = ()


def smoothed(values: list[float], window: int = 5) -> list[float]:
    """Trailing moving average over ``window`` rounds (fewer at the start)."""
    out = []
    for i in range(len(values)):
        part = [v for v in values[max(0, i - window + 1) : i + 1] if np.isfinite(v)]
        out.append(float(np.mean(part)) if part else float("nan"))
    return out


def largest_drop(values: list[float]) -> float:
    """The largest fall of a curve below its best value so far (0 for a curve that never falls)."""
    best, drop = -np.inf, 0.0
    for v in values:
        if not np.isfinite(v):
            continue
        best = max(best, v)
        drop = max(drop, best - v)
    return float(drop)


@dataclass
class SweepConfig:
    """Sizes of the sweep. Each trial runs ``rounds x samples_per_round`` reward queries."""

    output_dir: str = "runs/tuning"
    prompts: list[str] = field(default_factory=lambda: ["four red squares"])
    validation_prompts: list[str] = field(default_factory=lambda: ["four blue squares", "two blue triangles"])
    seeds: list[int] = field(default_factory=lambda: [0])
    validation_seeds: list[int] = field(default_factory=lambda: [0])
    # methods whose chosen setting is validated on the prompts not tuned on (empty: every method)
    validation_methods: list[str] = field(default_factory=lambda: ["dpok", "ddpo-is", "grpo", "diffusion-nft"])
    rounds: int = 25
    samples_per_round: int = 32
    eval_images: int = 32
    # the confirmation of the screening's best (confirm_top 0: none, the screening decides): another
    # prompt (the default run's) and a seed no exploration run used, judged on 8x the images (a
    # standard error of at most 0.5 / sqrt(256) = 0.031)
    confirm_top: int = 2
    confirm_prompts: list[str] = field(default_factory=lambda: ["two white triangles"])
    confirm_seeds: list[int] = field(default_factory=lambda: [2])
    confirm_images: int = 256
    checkpoint_every: int = 10
    common: dict[str, Any] = field(default_factory=dict)  # TrainConfig values of every trial and reference
    methods: dict[str, list[Candidate]] = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("rounds", "samples_per_round", "eval_images", "confirm_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"SweepConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.confirm_top < 0:
            raise ValueError(f"SweepConfig.confirm_top must be 0 (no confirmation) or more, got {self.confirm_top}")

    @property
    def budget(self) -> int:
        return self.rounds * self.samples_per_round


class Sweep:
    def __init__(self, cfg: SweepConfig, log: Any = print) -> None:
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.log = log
        self._reward = None

    def reward(self):  # noqa: ANN201
        if self._reward is None:
            self._reward = RewardConfig().build(torch.device("cpu"))  # the default reward, the sweep's
        return self._reward

    def trial_dir(self, stage: str, method: str, candidate: str, prompt: str, seed: int) -> Path:
        return self.out / stage / method / candidate / slug(prompt) / f"seed{seed}"

    def jobs(self, stage: str) -> list[tuple[Path, tuple[str, Candidate, str, int]]]:
        c = self.cfg
        jobs = []
        if stage == "trials":
            for seed in c.seeds:
                for prompt in c.prompts:
                    for method, candidates in c.methods.items():
                        for cand in candidates:
                            jobs.append((self.trial_dir(stage, method, cand.name, prompt, seed),
                                         (method, cand, prompt, seed)))
        elif stage == "confirmation":
            finalists = self.finalists()
            for seed in c.confirm_seeds:
                for prompt in c.confirm_prompts:
                    if finalists:  # the base model on the same images, for the report's comparison
                        jobs.append((self.trial_dir(stage, "base", "none", prompt, seed),
                                     ("base", Candidate("none"), prompt, seed)))
                    for method, cands in finalists.items():
                        for cand in cands:
                            jobs.append((self.trial_dir(stage, method, cand.name, prompt, seed),
                                         (method, cand, prompt, seed)))
        elif stage == "references":
            for prompt in dict.fromkeys(c.prompts + c.validation_prompts):
                for method in REFERENCES:
                    jobs.append((self.trial_dir(stage, method, "none", prompt, 0), (method, Candidate("none"), prompt, 0)))
        else:
            chosen = self.chosen()
            for seed in c.validation_seeds:
                for prompt in c.validation_prompts:
                    for method, cand in chosen.items():
                        if c.validation_methods and method not in c.validation_methods:
                            continue
                        jobs.append((self.trial_dir(stage, method, cand.name, prompt, seed),
                                     (method, cand, prompt, seed)))
        return jobs

    def base(self) -> dict[str, Any]:
        """The settings every candidate's overrides apply to: the defaults of the code that ran the
        sweep's first stage, kept in ``sweep.json``, so that defaults changed later (by the sweep's
        own outcome) do not change what later trials run from. A setting that did not exist then is
        frozen at its default when a stage first sees it (the behaviour the earlier trials had). A base
        frozen before ``--minibatch-size 0`` meant an algorithm's own update shape (``base_version`` 1)
        gets the whole round, up to 32 samples, that 0 meant then."""
        path = self.out / "sweep.json"
        kept = json.loads(path.read_text()) if path.is_file() else {}
        base = {**TrainConfig().to_dict(), **(kept.get("base") or {})}
        if kept.get("base") and kept.get("base_version", 1) < BASE_VERSION and base.get("minibatch_size") == 0:
            # frozen before --minibatch-size 0 meant an algorithm's own update shape: then it was the
            # whole round up to 32 samples for every method, which is what such a sweep's trials ran
            base["minibatch_size"] = largest_divisor_at_most(self.cfg.samples_per_round, 32)
        return base

    def _settings(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` on top of the sweep's base (only settings the code still has)."""
        # every option's flat name, the algorithms' own settings included (they live in nested groups)
        known = set(TrainConfig().to_dict())
        return {k: v for k, v in {**self.base(), **values}.items() if k in known}

    def images(self, folder: Path) -> int:
        """How many fixed-noise images judge a trial in ``folder``: the confirmation's or the sweep's."""
        return self.cfg.confirm_images if folder.is_relative_to(self.out / "confirmation") else self.cfg.eval_images

    def run_trial(self, folder: Path, method: str, cand: Candidate, prompt: str, seed: int) -> dict[str, Any]:
        c = self.cfg
        if method in REFERENCES:
            return self.run_reference(folder, method, prompt, seed)
        n = self.images(folder)
        run_dir = folder / "run"
        settings: dict[str, Any] = {
            "algorithm": method, "prompt": [prompt], "seed": seed, "rounds": c.rounds,
            "samples_per_round": c.samples_per_round, "output_dir": str(run_dir), "eval_images": 1,
            "checkpoint_every": c.checkpoint_every, "keep_checkpoints": 1, "device": c.device, **c.common,
            **dict(cand.overrides)}
        if (run_dir / "config.json").is_file():
            if latest_checkpoint(run_dir) is not None:
                settings["resume"] = str(run_dir)
            else:
                import shutil

                shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        trainer = Trainer(build_config(None, self._settings(settings)))
        trainer.run()
        train_s = time.perf_counter() - t0
        rows = read_metrics(run_dir / "metrics.jsonl")
        rewards = [r["reward/mean"] for r in rows]
        eval_settings = SampleSettings(n, trainer.cfg.num_steps, trainer.cfg.guidance_scale, 1.0)
        with trainer.parts.evaluated_weights():  # the EMA weights with --ema-decay, as the run's own evaluations
            row, images = evaluate_prompt(trainer.adapter, self.reward(), prompt, eval_settings, 555_000 + seed,
                                          trainer.domain)
        _save_strip(images, folder / "samples.png")
        result = {"method": method, "candidate": cand.name, "overrides": dict(cand.overrides), "prompt": prompt,
                  "seed": seed, "queries": trainer.reward_queries, "train_s": train_s, "machine": cpu_description(),
                  "eval_images": n,
                  "threads": torch.get_num_threads(),
                  "seconds_per_round": float(np.mean([sum(r.get(k, 0.0) for k in ROUND_PHASES) for r in rows]))
                  if rows else 0.0,
                  "curve": {"reward": rewards, "kl": [r.get("kl/rollout", 0.0) for r in rows]},
                  "smoothed_drop": largest_drop(smoothed(rewards)), "eval": row}
        _write_json(folder / "result.json", result)
        return result

    def run_reference(self, folder: Path, method: str, prompt: str, seed: int) -> dict[str, Any]:
        """The base model, or best-of-``best_of`` rejection sampling of it: nothing trained."""
        c = self.cfg
        n = self.images(folder)
        t0 = time.perf_counter()
        cfg = build_config(None, self._settings({
            "algorithm": "rejection-sampling", "prompt": [prompt], "seed": seed, "rounds": 1,
            "samples_per_round": c.samples_per_round, "output_dir": str(folder / "run"), "eval_images": 1,
            "device": c.device, **c.common}))
        if (folder / "run").exists():
            import shutil

            shutil.rmtree(folder / "run")
        trainer = Trainer(cfg)
        settings = SampleSettings(n, cfg.num_steps, cfg.guidance_scale, 1.0)
        images = None
        if method == "rejection-sampling":
            images = trainer.algorithm.generate([prompt] * n, torch.Generator().manual_seed(555_000 + seed))
        row, images = evaluate_prompt(trainer.adapter, self.reward(), prompt, settings, 555_000 + seed, trainer.domain,
                                      images)
        _save_strip(images, folder / "samples.png")
        result = {"method": method, "candidate": "none", "overrides": {}, "prompt": prompt, "seed": seed,
                  "eval_images": n,
                  "queries": 0, "train_s": time.perf_counter() - t0, "seconds_per_round": 0.0, "machine": cpu_description(),
                  "curve": {"reward": [], "kl": []}, "smoothed_drop": 0.0, "eval": row,
                  "queries_per_image": trainer.algorithm.reward_queries_per_image()}
        _write_json(folder / "result.json", result)
        return result

    def run(self, stage: str) -> int:
        _write_json(self.out / "sweep.json", {"config": _config_json(self.cfg), "budget": self.cfg.budget,
                                              "base": self.base(), "base_version": BASE_VERSION})
        jobs = self.jobs(stage)
        todo = [j for j in jobs if not (j[0] / "result.json").is_file()]
        self.log(f"{stage}: {len(todo)} of {len(jobs)} trial(s) left in {self.out}")
        ran = 0
        for folder, (method, cand, prompt, seed) in todo:
            if (folder / "result.json").is_file() or not claim(folder):
                continue
            try:
                r = self.run_trial(folder, method, cand, prompt, seed)
                e = r["eval"]
                self.log(f"{stage} {method}/{cand.name} '{prompt}' seed {seed}: judge {e['judge_aligned']:.3f} "
                         f"clean {e['clean_share']:.3f} reward {e['reward_mean']:.3f} drop {r['smoothed_drop']:.3f} "
                         f"({r['train_s']:.0f} s)")
                ran += 1
            finally:
                release(folder)
        return ran

    def results(self, stage: str) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted((self.out / stage).glob("*/*/*/seed*/result.json"))]

    def scores(self, stage: str) -> dict[str, dict[Candidate, tuple[float, float]]]:
        """Per method, (mean judge, mean reward) of each candidate whose every trial of ``stage`` on the
        stage's configured prompts and seeds is finished (results of other prompts or seeds, kept from
        an earlier configuration, do not count)."""
        c = self.cfg
        wanted = ({(p, s) for p in c.prompts for s in c.seeds} if stage == "trials"
                  else {(p, s) for p in c.confirm_prompts for s in c.confirm_seeds})
        results = [r for r in self.results(stage) if (r["prompt"], r["seed"]) in wanted]
        out: dict[str, dict[Candidate, tuple[float, float]]] = {}
        for method, candidates in c.methods.items():
            for cand in candidates:
                mine = [r for r in results if r["method"] == method and r["candidate"] == cand.name]
                if wanted and len(mine) == len(wanted):
                    out.setdefault(method, {})[cand] = (_mean(mine, "judge_aligned"), _mean(mine, "reward_mean"))
        return out

    def ranked(self) -> dict[str, list[Candidate]]:
        """Per method, its finished screening candidates, best first by the mean judge over the tuning
        prompts (ties: the mean reward, then the order the candidates are listed in)."""
        ranking = {}
        for method, scored in self.scores("trials").items():
            order = self.cfg.methods[method]
            ranking[method] = sorted(scored, key=lambda cand: (scored[cand], -order.index(cand)), reverse=True)
        return ranking

    def finalists(self) -> dict[str, list[Candidate]]:
        """Per method whose screening is complete (every candidate finished: equal care), its
        ``confirm_top`` best candidates by the screening (none without confirmation prompts or seeds)."""
        c = self.cfg
        if not (c.confirm_top and c.confirm_prompts and c.confirm_seeds):
            return {}
        return {m: cands[: c.confirm_top] for m, cands in self.ranked().items() if len(cands) == len(c.methods[m])}

    def chosen(self) -> dict[str, Candidate]:
        """Per method, the better of its finalists in the confirmation (ties: reward, then the screening's
        order) once every finalist's confirmation is finished; until then the screening's best among its
        finished candidates."""
        best = {m: cands[0] for m, cands in self.ranked().items()}
        confirmed = self.scores("confirmation")
        for method, finalists in self.finalists().items():
            scored = confirmed.get(method, {})
            if all(cand in scored for cand in finalists):
                best[method] = max(finalists, key=lambda cand: (scored[cand], -finalists.index(cand)))
        return best


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.mean([r["eval"][key] for r in rows]))


def _config_json(cfg: SweepConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["output_dir"] = portable_path(d["output_dir"])
    d["methods"] = {m: [{"name": c.name, "overrides": dict(c.overrides)} for c in cands]
                    for m, cands in cfg.methods.items()}
    return d


def load_sweep(folder: str | Path) -> Sweep:
    """The sweep whose results are kept in ``folder``: its ``sweep.json`` names the candidates and the
    base their settings apply to, its stage folders hold the trials' results."""
    path = Path(folder) / "sweep.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tuning sweep's results there; give the folder of a sweep's kept results "
                                "(the project's: docs/tuning/data), or run benchmarks/tune.py first")
    config = json.loads(path.read_text())["config"]
    methods = {m: [Candidate(c["name"], tuple(c["overrides"].items())) for c in cands]
               for m, cands in config.get("methods", {}).items()}
    known = {f.name for f in dataclasses.fields(SweepConfig)} - {"output_dir", "methods"}
    return Sweep(SweepConfig(output_dir=str(folder), methods=methods, **{k: v for k, v in config.items() if k in known}))


def tuned_settings(folder: str | Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """Per method, its chosen candidate's name and the training settings its trials ran with: the sweep's
    frozen base plus the candidate's overrides, without :data:`RUN_SETTINGS`. Another run that takes
    them trains each method exactly as the sweep did when it chose it (equal optimisation care)."""
    sweep = load_sweep(folder)
    chosen = sweep.chosen()
    if not chosen:
        raise ValueError(f"{folder}: the sweep has no finished trials, so no method has a chosen setting yet")
    return {method: (cand.name, {k: v for k, v in sweep._settings(dict(cand.overrides)).items()
                                 if k not in RUN_SETTINGS})
            for method, cand in chosen.items()}
