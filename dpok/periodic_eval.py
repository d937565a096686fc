"""In-training evaluation (``--eval-every N``): the policy on fixed prompts with fixed noise.

Every N rounds (and before the first, and after the last) the main process samples
``eval_every_images`` images for each of up to :data:`MAX_PROMPTS` seen (training) prompts and as
many unseen ones (``--eval-prompt``, ``--eval-prompt-set``), each prompt from the same seed every
time, so that differences between rounds come from the weights alone. Measured per split (the
mean over its prompts; see :func:`dpok.evaluate.evaluate_prompt`): the reward, the KL to the base
model along the sampled trajectories, the diversity, and on ShapeWorld the geometric judge's
aligned share, the clean-shape share and the Fréchet distance to true renders. Logged as
``eval/<split>/<measure>`` to ``eval.jsonl`` (one row per evaluation) and the trackers, with one
image grid per evaluation in ``eval/`` and, at the end, the curves in ``eval_curves.png``: a rising reward with
a falling judge or clean share is over-optimisation, seen as it happens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .adapter import DiffusionAdapter
from .domains import Domain
from .evaluate import MEASURES, SampleSettings, evaluate_prompt, prompt_label
from .rewards import Reward
from .runlog import RunLog, read_metrics
from .sampling import sample_in_batches
from .viz import save_prompt_grid

if TYPE_CHECKING:
    from .run_parts import RunParts

BEFORE_AFTER_SEED = 10_000  # the before/after evaluation's seeds: away from the training streams
MAX_PROMPTS = 4  # per split: the cost of an evaluation stays bounded
GRID_IMAGES = 8
SEED_BASE = 20_000  # away from the training streams and the before/after evaluation's seeds
CURVES = (("reward_mean", "reward"), ("judge_aligned", "judge: aligned share"), ("clean_share", "clean-shape share"),
          ("frechet", "Fréchet distance to renders"), ("kl_to_base", "KL to base (nats)"))


@dataclass(frozen=True)
class EvalPlan:
    """What one in-training evaluation samples: the prompts of each split, the images per prompt,
    the sampler settings and the seed of each prompt (the same at every evaluation)."""

    splits: dict[str, list[str]]
    settings: SampleSettings
    seed: int
    domain: Domain | None

    def prompt_seed(self, split: int, index: int) -> int:
        return SEED_BASE + self.seed * 100 + 50 * split + index


def make_plan(seen: list[str], unseen: list[str], images: int, num_steps: int, guidance_scale: float, eta: float,
              seed: int, domain: Domain | None, batch_size: int = 32) -> EvalPlan:
    """The plan of a run: its first :data:`MAX_PROMPTS` training prompts, and as many unseen ones."""
    splits = {"seen": list(seen[:MAX_PROMPTS])}
    if unseen:
        splits["unseen"] = list(unseen[:MAX_PROMPTS])
    settings = SampleSettings(images, num_steps, guidance_scale, eta, batch_size=min(batch_size, images))
    return EvalPlan(splits, settings, seed, domain)


def evaluate_policy(adapter: DiffusionAdapter, reward: Reward, plan: EvalPlan
                    ) -> tuple[dict[str, float], list[np.ndarray], list[str]]:
    """One evaluation: ``eval/<split>/<measure>`` means, and the grid's rows (N, H, W, 3) and labels."""
    metrics: dict[str, float] = {}
    rows, labels = [], []
    for s, (split, prompts) in enumerate(plan.splits.items()):
        per_prompt = {}
        for i, prompt in enumerate(prompts):
            row, images = evaluate_prompt(adapter, reward, prompt, plan.settings, plan.prompt_seed(s, i),
                                          plan.domain)
            per_prompt[prompt] = row
            rows.append(images[:GRID_IMAGES].permute(0, 2, 3, 1).cpu().numpy())
            labels.append(f"{split}: {prompt_label(prompt, row)}")
        for measure in MEASURES:
            values = [v[measure] for v in per_prompt.values() if measure in v]
            if values:  # NaN (not measured) only when no prompt has the measure
                finite = [v for v in values if not math.isnan(v)]
                metrics[f"eval/{split}/{measure}"] = float(np.mean(finite)) if finite else float("nan")
    return metrics, rows, labels


def before_after_rewards(parts: RunParts, prompts: list[str], base: bool = False
                         ) -> tuple[dict[str, float], list[np.ndarray]]:
    """The before/after evaluation: mean reward per prompt over ``eval_images`` fixed-seed samples
    (same seeds every call), and each prompt's first :data:`GRID_IMAGES` images (N, H, W, 3).

    ``base=True`` samples the pretrained policy; otherwise the method's own output (for
    rejection sampling, the best of ``best_of``)."""
    cfg, per_prompt, rows = parts.cfg, {}, []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(BEFORE_AFTER_SEED + cfg.seed * 100 + i)
        batch = [prompt] * cfg.eval_images
        if base:
            images = sample_in_batches(parts.adapter, batch, cfg.sample_batch_size, cfg.num_steps, cfg.eta,
                                       cfg.guidance_scale, gen, reference=True).images
        else:
            images = parts.algorithm.generate(batch, gen)
        out = parts.reward(images, [prompt] * len(images))
        per_prompt[prompt] = float(out.scores[out.valid].mean()) if out.valid.any() else float("nan")
        rows.append(images[:GRID_IMAGES].permute(0, 2, 3, 1).cpu().numpy())
    return per_prompt, rows


def evaluate_run(parts: RunParts, round_: int, log: RunLog | None) -> dict[str, float] | None:
    """The ``--eval-every`` evaluation of the current weights (main process; the others wait and get
    None): ``eval/*`` means to ``eval.jsonl`` and the trackers, a grid to ``eval/round-N.png``."""
    cfg, metrics = parts.cfg, None
    if parts.is_main:
        plan = make_plan(parts.prompts, parts.eval_unseen, cfg.eval_every_images, cfg.num_steps, cfg.guidance_scale,
                         cfg.eta, cfg.seed, parts.domain, cfg.sample_batch_size)
        with parts.evaluated_weights():
            metrics, rows, labels = evaluate_policy(parts.adapter, parts.reward, plan)
        grid = record(parts.out, round_, metrics, rows, labels)
        if log is not None:
            log.log_scalars(metrics, round_)
            log.log_png("eval/grid", grid, round_)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in metrics.items()
                          if k.endswith(("reward_mean", "judge_aligned")))
        tqdm.write(f"eval after round {round_}: {shown}")
    distributed.barrier()
    return metrics


def grid_path(run_dir: Path, round_: int) -> Path:
    return Path(run_dir) / "eval" / f"round-{round_:06d}.png"


def record(run_dir: Path, round_: int, metrics: dict[str, float], rows: list[np.ndarray], labels: list[str]) -> Path:
    """Append the row to ``eval.jsonl`` and write the round's grid; returns the grid. (The trackers
    draw the curves as the run goes; ``eval_curves.png`` is drawn at the end.)"""
    run_dir = Path(run_dir)
    clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
    with open(run_dir / "eval.jsonl", "a") as f:
        f.write(json.dumps({"round": round_, **clean}) + "\n")
    return save_prompt_grid(rows, labels, grid_path(run_dir, round_))


def truncate(run_dir: Path, round_: int) -> None:
    """Keep the evaluations of rounds <= ``round_`` (a resumed run evaluates the later ones again)."""
    path = Path(run_dir) / "eval.jsonl"
    if path.is_file():
        rows = [r for r in read_metrics(path) if r["round"] <= round_]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_eval_curves(path: Path, out: Path) -> bool:
    """One panel per measure against rounds, a line per split; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    shown = [(m, title) for m, title in CURVES if any(k.endswith(f"/{m}") and r[k] is not None
                                                      for r in rows for k in r)]
    if not rows or not shown:
        return False
    splits = sorted({k.split("/")[1] for r in rows for k in r if k.startswith("eval/")}, key=["seen", "unseen"].index)
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.0), squeeze=False)
    for ax, (measure, title) in zip(axes[0], shown):
        for split in splits:
            key = f"eval/{split}/{measure}"
            points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=split)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
