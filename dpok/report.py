"""Turn a paper-experiment outcome folder (:mod:`dpok.experiment`) into ``results.md`` with tables,
figures and a reading of the four claims. Every number is computed here from the result files."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from .assets import EMBEDDED_MODELS
from .domains import domain_for
from .experiment import Task, default_methods, default_tasks, load_results

# (key in a split's means, column title, higher is better)
MEASURES = (
    ("reward_mean", "reward", True),
    ("judge_aligned_mean", "judge aligned", True),
    ("clean_share_mean", "clean shapes", True),
    ("frechet_mean", "Fréchet dist.", False),
    ("diversity_mean", "diversity", True),
    ("kl_to_base_mean", "KL to base", False),
)


def _stats(values: list[float]) -> tuple[float, float, int]:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _fmt(mean: float, std: float, n: int) -> str:
    if n == 0 or not np.isfinite(mean):
        return "—"
    return f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}"


class Summary:
    """Unit results grouped by (task, method, split): per-seed values of every measure."""

    def __init__(self, units: list[dict[str, Any]]) -> None:
        self.values: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
        self.seeds: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.units = units
        for u in units:
            self.seeds[(u["task"], u["method"])].append(u["seed"])
            for split, data in u["splits"].items():
                for key, _, _ in MEASURES:
                    self.values[(u["task"], u["method"], split, key)].append(data.get(key, float("nan")))

    def stat(self, task: str, method: str, split: str, key: str) -> tuple[float, float, int]:
        return _stats(self.values.get((task, method, split, key), []))

    def has(self, task: str, method: str) -> bool:
        return bool(self.seeds.get((task, method)))


def identical_methods(units: list[dict[str, Any]], methods: list) -> dict[str, tuple[str, int]]:
    """Methods whose every unit equals, measure for measure, the unit of an earlier-listed method
    with the same task and seed: ``{later method: (earlier method, units compared)}``.

    Two trained methods can be one computation under their chosen settings (GRPO with beta = 0 and
    DDPO-IS with per-prompt advantages and the same clip range); the tables would then show one
    result twice, and a reader must be told it is not two methods agreeing.
    """
    trained = [m.name for m in methods if m.trains]
    by_key = {(u["task"], u["method"], u["seed"]): u for u in units}
    out: dict[str, tuple[str, int]] = {}
    for i, later in enumerate(trained):
        mine = [u for u in units if u["method"] == later]
        for earlier in trained[:i]:
            pairs = [(u, by_key.get((u["task"], earlier, u["seed"]))) for u in mine]
            pairs = [(a, b) for a, b in pairs if b is not None]
            if pairs and all(a["splits"] == b["splits"] for a, b in pairs):
                out[later] = (earlier, len(pairs))
                break
    return out


def _unit(units: list[dict[str, Any]], task: str, method: str, seed: int) -> dict[str, Any] | None:
    return next((u for u in units if u["task"] == task and u["method"] == method and u["seed"] == seed), None)


def _pyplot():  # noqa: ANN202
    """pyplot on the file-only backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish_task_row(fig, axes, tasks: list, xlabel: str, ylabel: str, path: Path) -> Path:  # noqa: ANN001
    """Titles, labels, legend of a one-row-per-task figure; save and close it."""
    for ax, task in zip(axes[0], tasks):
        ax.set_title(task.title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    if axes[0][-1].get_legend_handles_labels()[0]:
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    _pyplot().close(fig)
    return path


# ------------------------------------------------------------------------------------- figures
def plot_reward_vs_queries(units: list[dict[str, Any]], tasks: list, methods: list, path: Path) -> Path:
    """Training-batch reward against reward queries, mean over seeds with a band of one std."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method in methods:
            curves = [u["curve"] for u in units if u["task"] == task.name and u["method"] == method.name and u["curve"]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            q = np.array([c["queries"] for c in curves[0][:n]])
            r = np.array([[c["reward"] for c in curve[:n]] for curve in curves])
            mean = np.nanmean(r, 0)
            ax.plot(q, mean, label=method.name)
            if len(curves) > 1:
                std = np.nanstd(r, 0)
                ax.fill_between(q, mean - std, mean + std, alpha=0.15)
    return _finish_task_row(fig, axes, tasks, "reward queries", "training reward (batch mean)", path)


def plot_quality_vs_reward(summary: Summary, tasks: list, methods: list, path: Path) -> Path:
    """Per task, each method's evaluation reward (x) against its Fréchet distance to true renders (y)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
    markers = "os^vDP*X"
    for ax, task in zip(axes[0], tasks):
        for k, method in enumerate(methods):
            rm, rs, n = summary.stat(task.name, method.name, "seen", "reward_mean")
            fm, fs, _ = summary.stat(task.name, method.name, "seen", "frechet_mean")
            if n == 0 or not np.isfinite(fm):
                continue
            ax.errorbar(rm, fm, xerr=rs, yerr=fs, fmt=markers[k % len(markers)], label=method.name, capsize=2)
    return _finish_task_row(fig, axes, tasks, "evaluation reward (seen prompts)",
                            "Fréchet distance to true renders (lower = better)", path)


def _kept_figure(path: Path, has_results: bool) -> Path | None:
    """The figure at ``path`` drawn by an earlier report, for results whose images the folder being
    reported does not hold (the raw data kept in docs/results/data are JSON only): ``path`` if it
    exists and there are results it shows, else None. Which run drew it is not checked: rewrite a
    report from data without images only into the folder whose figures came from those runs."""
    return path if has_results and path.is_file() else None


def labelled_rows(rows: list[tuple[str, Path]], path: Path, scale: int = 2) -> Path | None:
    """Stack image strips (PNG files) with a label above each; missing files are left out."""
    strips = [(label, Image.open(p).convert("RGB")) for label, p in rows if p.is_file()]
    if not strips:
        return None
    width = max(s.width for _, s in strips) * scale
    height = sum(s.height * scale + 14 for _, s in strips)
    canvas = Image.new("RGB", (width, height), (32, 32, 32))
    draw, y = ImageDraw.Draw(canvas), 0
    for label, strip in strips:
        draw.text((2, y + 1), label, fill=(230, 230, 230))
        canvas.paste(strip.resize((strip.width * scale, strip.height * scale), Image.NEAREST), (0, y + 14))
        y += strip.height * scale + 14
    canvas.save(path)
    return path


def plot_overopt(overopt: dict[str, list[dict[str, Any]]], path: Path) -> Path | None:
    """Evaluation reward, judge, Fréchet distance, clean share and KL against reward queries, per beta."""
    if not overopt:
        return None
    plt = _pyplot()
    panels = [("reward_mean", "reward (training reward model)"), ("judge_aligned", "judge aligned (independent)"),
              ("frechet", "Fréchet distance (lower = better)"), ("clean_share", "clean-shape share"),
              ("diversity", "diversity"), ("kl_to_base", "KL to base (nats)")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.4))
    for ax, (key, title) in zip(axes.flat, panels):
        for beta, points in overopt.items():
            q = [p["queries"] for p in points if key in p]
            ax.plot(q, [p[key] for p in points if key in p], marker="o", label=f"beta = {beta}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("reward queries")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------- reading
def _compare(summary: Summary, tasks: list, a: str, b: str, split: str, key: str, higher: bool) -> list[str]:
    """One line per task: a vs b on one measure, with the verdict and whether the gap exceeds the
    seeds' spread (difference larger than the sum of the two standard errors)."""
    lines = []
    for task in tasks:
        ma, sa, na = summary.stat(task.name, a, split, key)
        mb, sb, nb = summary.stat(task.name, b, split, key)
        if na == 0 or nb == 0 or not (np.isfinite(ma) and np.isfinite(mb)):
            continue
        diff = ma - mb
        better = diff > 0 if higher else diff < 0
        se = sa / np.sqrt(na) + sb / np.sqrt(nb)
        clear = abs(diff) > se and na > 1 and nb > 1
        verdict = ("better" if better else "worse") + (" (beyond seed spread)" if clear else " (within seed spread)")
        if diff == 0:
            verdict = "equal"
        lines.append(f"  - {task.title}: {a} {ma:.3f} vs {b} {mb:.3f} → {a} {verdict}")
    return lines


def _tally(summary: Summary, tasks: list, a: str, b: str, split: str, key: str, higher: bool) -> tuple[int, int]:
    wins = total = 0
    for task in tasks:
        ma, _, na = summary.stat(task.name, a, split, key)
        mb, _, nb = summary.stat(task.name, b, split, key)
        if na and nb and np.isfinite(ma) and np.isfinite(mb):
            total += 1
            wins += int(ma > mb if higher else ma < mb)
    return wins, total


def share_difference_noise(a: float, b: float, n: int) -> float:
    """Two standard errors of the difference of two shares measured on ``n`` images each
    (binomial): a smaller change of a judged share is within the noise of the evaluation."""
    return 2.0 * math.sqrt((a * (1 - a) + b * (1 - b)) / max(n, 1))


def overopt_reading(overopt: dict[str, list[dict[str, Any]]], images: int) -> list[str]:
    """What each over-optimisation run shows; a judge change smaller than two standard errors of
    ``images`` evaluation images is called noise, not a trend."""
    lines = []
    for beta, points in overopt.items():
        if len(points) < 2 or "judge_aligned" not in points[0]:
            continue
        first, last = points[0], points[-1]
        peak = max(points, key=lambda p: p["judge_aligned"])
        lines.append(
            f"- beta = {beta}: from {first['queries']} to {last['queries']} queries the evaluation reward went "
            f"{first['reward_mean']:.3f} → {last['reward_mean']:.3f}, the independent judge {first['judge_aligned']:.3f} → "
            f"{last['judge_aligned']:.3f} (best {peak['judge_aligned']:.3f} at {peak['queries']} queries), the Fréchet "
            f"distance {first['frechet']:.3f} → {last['frechet']:.3f}, the clean-shape share {first['clean_share']:.3f} → "
            f"{last['clean_share']:.3f}, the KL to the base {last['kl_to_base']:.2f} nats at the end.")
        if last["reward_mean"] < first["reward_mean"] - 0.1:
            lines.append(f"  Training collapsed rather than over-optimised: the evaluation reward itself fell "
                         f"({first['reward_mean']:.3f} → {last['reward_mean']:.3f}) as the policy moved far from the base.")
        after = [p for p in points if p["round"] > peak["round"]]
        if after and after[-1]["reward_mean"] > peak["reward_mean"] and after[-1]["judge_aligned"] < peak["judge_aligned"]:
            fall = peak["judge_aligned"] - after[-1]["judge_aligned"]
            noise = share_difference_noise(peak["judge_aligned"], after[-1]["judge_aligned"], images)
            trend = ("Over-optimisation is visible" if fall > noise else
                     f"A hint of over-optimisation, within the noise of {images} images (a fall below {noise:.3f})")
            lines.append(f"  {trend}: after {peak['queries']} queries the reward kept rising "
                         f"({peak['reward_mean']:.3f} → {after[-1]['reward_mean']:.3f}) while the judge fell "
                         f"({peak['judge_aligned']:.3f} → {after[-1]['judge_aligned']:.3f}).")
        elif after:
            lines.append("  The reward did not rise while the judge fell after its best point within this run.")
        if last["frechet"] > first["frechet"]:
            lines.append(f"  Image quality by the Fréchet distance got worse ({first['frechet']:.3f} → {last['frechet']:.3f}).")
        else:
            lines.append(f"  Image quality by the Fréchet distance did not get worse ({first['frechet']:.3f} → "
                         f"{last['frechet']:.3f}).")
    return lines


# ----------------------------------------------------------------------------------- report

def _settings_note(cfg: dict[str, Any], units: list[dict[str, Any]]) -> str:
    """How the methods were set: the package defaults, or each method's tuned setting (named)."""
    if cfg.get("method_settings", "defaults") != "tuned":
        return "every other setting is the package default for each algorithm."
    chosen = {u["method"]: u["tuned_candidate"] for u in units if "tuned_candidate" in u}
    named = ", ".join(f"{m} `{c}`" for m, c in sorted(chosen.items()))
    note = ("each trained method with the setting its tuning sweep chose (docs/tuning.md), exactly as the sweep's "
            "trials ran it, so every method had the same optimisation care" + (f": {named}." if named else "."))
    return note + _reuse_note(units)


def _reuse_note(units: list[dict[str, Any]]) -> str:
    """Which units were copied from another experiment where they ran with the same settings."""
    copied: dict[str, list[str]] = {}
    for u in units:
        if "reused_from" in u:
            copied.setdefault(u["reused_from"]["experiment"], []).append(f"{u['task']} {u['method']} seed {u['seed']}")
    return "".join(f" {len(names)} unit(s) ran with exactly these settings in the experiment of `{source}` and were "
                   f"copied from it, not trained again ({', '.join(sorted(set(u.split()[1] for u in names)))})."
                   for source, names in sorted(copied.items()))


def write_report(results_dir: str | Path, out_md: str | Path, figures_dir: str | Path | None = None,
                 raw_dir: str = "docs/results/data", report_path: str = "docs/results.md") -> Path:
    """Write the markdown report and its figures (by default in a folder named like the report,
    ``docs/results/`` for ``docs/results.md``); return the report's path. ``raw_dir``, ``report_path``:
    the folder of the kept result files and the report's path as the report names them (relative
    to the repository)."""
    meta, units, overopt = load_results(results_dir)
    cfg = meta["config"]
    out_md = Path(out_md)
    fig_dir = Path(figures_dir) if figures_dir else out_md.parent / out_md.stem
    fig_dir.mkdir(parents=True, exist_ok=True)
    custom = cfg.get("custom_seen") or []
    all_tasks = [Task("custom", "custom prompts", tuple(custom), tuple(cfg.get("custom_unseen") or []))] if custom \
        else default_tasks(domain_for(cfg["model"], cfg.get("reward", "")))
    tasks = [t for t in all_tasks if t.name in cfg["tasks"]]
    methods = [m for m in default_methods() if m.name in cfg["methods"]]
    summary = Summary(units)
    twins = identical_methods(units, methods)
    titles = {m.name: m.title for m in methods}
    rel = lambda p: Path(p).resolve().relative_to(out_md.parent.resolve()).as_posix()  # noqa: E731

    expected = len(tasks) * len(methods) * len(cfg["seeds"])
    title = EMBEDDED_MODELS.get(cfg["model"], f"`{cfg['model']}`")
    lines = [f"# Results: the paper experiment on {title}", "",
             "Generated by `benchmarks/paper_experiment.py` from the result files of the experiment; "
             "no number here is typed by hand. Rerun the script to reproduce or extend it. The result files "
             f"(JSON) are kept in `{raw_dir.rstrip('/')}/`; `python benchmarks/paper_experiment.py --report-only "
             f"--output-dir {raw_dir.rstrip('/')} --report {report_path}` rewrites the tables and "
             "curves from them.", "",
             "## Set-up", "",
             f"- Model `{cfg['model']}`, training reward `{cfg['reward']}`; {cfg['num_steps']} DDIM steps, eta 1, guidance "
             f"{cfg['guidance_scale']}; LoRA; {_settings_note(cfg, units)}",
             f"- Budget: every trained method spends {meta['budget']} reward queries ({cfg['rounds']} rounds × "
             f"{cfg['samples_per_round']} samples). Rejection sampling trains nothing and spends `best_of` queries "
             "per generated image instead (column *queries/image*).",
             f"- Seeds {', '.join(map(str, cfg['seeds']))}; {len(units)} of {expected} (task, method, seed) units "
             f"finished. Tables give mean ± sample std over the finished seeds (n in the last column).",
             f"- Evaluation: {cfg['eval_images']} images per prompt on single-prompt tasks, {cfg['multi_eval_images']} "
             "per prompt on the multi-prompt task, with the same noise for every method. *Judge aligned*: share of "
             "images an exact geometric check of the drawn objects (colours, shapes, counts, relations) finds to "
             "match the prompt; it shares no weights with the reward. *Clean shapes*: share of images whose objects "
             "are all clean shapes. *Fréchet dist.*: between hand-built image features of the samples and of true "
             "renders of the same prompt (lower is better). *KL to base*: sum over steps of the closed-form KL "
             "between the fine-tuned and base policies along the sampled trajectories (nats; not defined for "
             "best-of-n, whose KL to the base is at most log n − (n − 1)/n).", ""]

    lines += ["## Tables", ""]
    for task in tasks:
        splits = ["seen", "unseen"] if task.unseen else ["seen"]
        for split in splits:
            prompts = task.seen if split == "seen" else task.unseen
            lines += [f"### {task.title} — {split} prompts", "", f"Prompts: {', '.join(f'`{p}`' for p in prompts)}", ""]
            head = "| method | train queries | queries/image | " + " | ".join(t for _, t, _ in MEASURES) + " | n |"
            lines += [head, "|" + "---|" * (len(MEASURES) + 4)]
            for m in methods:
                if not summary.has(task.name, m.name):
                    continue
                us = [u for u in units if u["task"] == task.name and u["method"] == m.name]
                cells = [_fmt(*summary.stat(task.name, m.name, split, k)) for k, _, _ in MEASURES]
                n = summary.stat(task.name, m.name, split, "reward_mean")[2]
                label = m.title + (f" (= {titles[twins[m.name][0]]}, see below)" if m.name in twins else "")
                lines.append(f"| {label} | {us[0]['train_queries']} | {us[0]['queries_per_image']} | "
                             + " | ".join(cells) + f" | {n} |")
            lines.append("")

    lines += ["## Figures", ""]
    trained = [m for m in methods if m.trains]
    f1 = plot_reward_vs_queries(units, tasks, trained, fig_dir / "reward_vs_queries.png")
    lines += ["Training reward against reward queries (mean over seeds, band = one std):", "",
              f"![reward vs queries]({rel(f1)})", ""]
    if any(np.isfinite(summary.stat(t.name, m.name, "seen", "frechet_mean")[0]) for t in tasks for m in methods):
        f2 = plot_quality_vs_reward(summary, tasks, methods, fig_dir / "quality_vs_reward.png")
        lines += ["Image quality against reward after fine-tuning (error bars = std over seeds):", "",
                  f"![quality vs reward]({rel(f2)})", ""]
    seed0 = cfg["seeds"][0]
    for task in tasks:
        for split in (["seen", "unseen"] if task.unseen else ["seen"]):
            prompt = (task.seen if split == "seen" else task.unseen)[0]
            rows = [(f"{m.name} (seed {seed0})", Path(results_dir) / "units" / task.name / m.name / f"seed{seed0}"
                     / "images" / f"{split}_00.png") for m in methods]
            grid = labelled_rows(rows, fig_dir / f"grid_{task.name}_{split}.png") or _kept_figure(
                fig_dir / f"grid_{task.name}_{split}.png", any(u["task"] == task.name for u in units))
            if grid:
                lines += [f"Samples for `{prompt}` ({task.title}, {split}); first row is the base model:", "",
                          f"![{task.name} {split}]({rel(grid)})", ""]

    lines += ["## Over-optimisation study", ""]
    f3 = plot_overopt(overopt, fig_dir / "overoptimization.png")
    if f3:
        lines += [f"DPOK on `{cfg['overopt_prompt']}` for up to {cfg['overopt_rounds']} rounds × "
                  f"{cfg['overopt_samples_per_round']} samples (constant learning rate "
                  f"{cfg['overopt_learning_rate']}), evaluated every {cfg['overopt_eval_every']} "
                  f"rounds on {cfg['overopt_eval_images']} images:", "", f"![over-optimisation]({rel(f3)})", ""]
        lines += overopt_reading(overopt, int(cfg["overopt_eval_images"])) + [""]
        for beta, points in overopt.items():
            rows = [(f"beta {beta}, {p['queries']} queries: reward {p['reward_mean']:.2f}"
                     + (f", judge {p['judge_aligned']:.2f}" if "judge_aligned" in p else ""),
                     Path(results_dir) / "overopt" / f"beta{beta}" / "images" / f"round{p['round']:04d}.png") for p in points]
            grid = labelled_rows(rows, fig_dir / f"overopt_beta{beta}.png") or _kept_figure(
                fig_dir / f"overopt_beta{beta}.png", bool(points))
            if grid:
                lines += [f"Samples along the run, beta = {beta}:", "", f"![beta {beta}]({rel(grid)})", ""]
    else:
        lines += ["Not run yet.", ""]

    lines += ["## Reading: the four claims", ""] + claims_reading(summary, tasks, methods) + [""]
    lines += ["## What else the numbers say", ""] + other_findings(summary, tasks, methods, cfg) + [""]
    if twins:
        lines[-1:-1] = [f"- {titles[later]}'s results equal {titles[earlier]}'s in every measure on all {n} (task, seed) "
                        f"unit(s) both finished: with the settings they ran with here the two are the same computation, "
                        "so their rows are one result shown twice, not two methods agreeing."
                        for later, (earlier, n) in twins.items()]
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text("\n".join(lines) + "\n")
    return out_md


def claims_reading(summary: Summary, tasks: list, methods: list) -> list[str]:
    """The four claims, each checked per task on the measures that bear on it."""
    names = {m.name for m in methods}
    out: list[str] = []

    def claim(title: str, a: str, b: str, checks: list[tuple[str, str, str, bool]]) -> None:
        if not {a, b} <= names:
            return
        out.append(f"**{title}**")
        out.append("")
        for split, key, label, higher in checks:
            wins, total = _tally(summary, tasks, a, b, split, key, higher)
            if total == 0:
                continue
            out.append(f"- {label} ({split} prompts): {a} better on {wins} of {total} task(s).")
            out.extend(_compare(summary, tasks, a, b, split, key, higher))
        out.append("")

    claim("(1) Online RL beats supervised fine-tuning at the same reward queries (DPOK vs SFT-KL).", "dpok", "sft-kl",
          [("seen", "reward_mean", "reward", True), ("seen", "judge_aligned_mean", "independent judge", True),
           ("seen", "frechet_mean", "image quality (Fréchet, lower better)", False)])
    claim("(2) KL regularisation keeps image quality (DPOK vs DPOK without KL).", "dpok", "dpok-no-kl",
          [("seen", "frechet_mean", "image quality (Fréchet, lower better)", False),
           ("seen", "clean_share_mean", "clean-shape share", True),
           ("seen", "kl_to_base_mean", "KL to base (lower)", False),
           ("seen", "reward_mean", "reward", True)])
    out.append("See also the over-optimisation study above, which tests this claim over a longer run.")
    out.append("")
    claim("(3) DDPO-IS beats RWR.", "ddpo-is", "rwr",
          [("seen", "reward_mean", "reward", True), ("seen", "judge_aligned_mean", "independent judge", True)])
    multi = [t for t in tasks if t.unseen]
    if multi and "base" in names:
        task = multi[0]
        out.append("**(4) Fine-tuning on some prompts carries over to unseen ones (multi-prompt task, vs the base).**")
        out.append("")
        bm, _, bn = summary.stat(task.name, "base", "unseen", "reward_mean")
        bj, _, _ = summary.stat(task.name, "base", "unseen", "judge_aligned_mean")
        for m in methods:
            if not m.trains or not bn:
                continue
            mm, ms, mn = summary.stat(task.name, m.name, "unseen", "reward_mean")
            mj, _, _ = summary.stat(task.name, m.name, "unseen", "judge_aligned_mean")
            if mn == 0:
                continue
            out.append(f"- {m.name}: unseen reward {mm:.3f} vs base {bm:.3f} ({mm - bm:+.3f}); unseen judge {mj:.3f} vs "
                       f"base {bj:.3f} ({mj - bj:+.3f}).")
        out.append("")
    return out


def other_findings(summary: Summary, tasks: list, methods: list, cfg: dict[str, Any]) -> list[str]:
    """Findings outside the four claims that a reader needs to weigh them, each computed."""
    if cfg.get("method_settings", "defaults") == "tuned":
        care = ("each method runs the setting its own tuning sweep chose at 800 reward queries (see Set-up), "
                "not one tuned for this budget")
    else:
        care = "no method's settings were tuned for it: every method uses the package defaults"
    out = [f"- The budget per trained method is small (see Set-up) and {care}. Differences marked *within seed "
           "spread* above are not evidence either way."]
    trained = [m for m in methods if m.trains]
    if trained:
        worst = defaultdict(int)
        for task in tasks:
            kls = {m.name: summary.stat(task.name, m.name, "seen", "kl_to_base_mean")[0] for m in trained}
            kls = {k: v for k, v in kls.items() if np.isfinite(v)}
            if kls:
                worst[max(kls, key=kls.get)] += 1
        for name, count in sorted(worst.items(), key=lambda kv: -kv[1]):
            out.append(f"- {name} moved furthest from the base model (largest KL to base) on {count} of {len(tasks)} "
                       "task(s).")
    if any(m.name == "rejection" for m in methods):
        best = 0
        for task in tasks:
            rewards = {m.name: summary.stat(task.name, m.name, "seen", "reward_mean")[0] for m in methods}
            rewards = {k: v for k, v in rewards.items() if np.isfinite(v)}
            best += int(bool(rewards) and max(rewards, key=rewards.get) == "rejection")
        out.append(f"- Rejection sampling has the highest reward on {best} of {len(tasks)} task(s), but it pays its "
                   "`best_of` reward queries for every image it will ever generate and needs the reward model at "
                   "inference; the trained methods pay their budget once.")
    if "base" in {m.name for m in methods}:
        for task in tasks:
            base = summary.stat(task.name, "base", "seen", "judge_aligned_mean")[0]
            if np.isfinite(base) and base == 0:
                out.append(f"- On {task.title} the base model never draws an aligned image by the judge, so a method "
                           "that learns only from its own samples sees almost no positive reward at this budget.")
    return out
