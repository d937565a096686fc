"""The default run, as a new user runs it, measured: then docs/default_run.md and the README figures.

    python benchmarks/default_run.py                 # `dpok train` with no options, then `dpok eval`
    python benchmarks/default_run.py --prompts       # the default prompt only
    python benchmarks/default_run.py --report-only   # rewrite the report from runs/default-run
    python benchmarks/default_run.py --eval-only     # evaluate the runs there again (new measures), then report

Runs ``dpok train`` (no options but the run folder) in a subprocess and times it as a user sees it,
model loading and the before/after evaluation included; then ``dpok eval`` of the base model and of
the run's LoRA on the default prompt (``--images``, the same noise for both): the independent
geometric judge, the clean-shape share, the reward and the KL to the base; and best-of-8 rejection
sampling of the base on the same prompt, the method that pays at every image what training pays once.
Then the same for each of ``--prompts`` with ``dpok train --prompt P`` and nothing else: the defaults
on prompts they were not tuned on (a count of four, a held-out pair, another rare pair). Writes the
report with the CPU it ran on and copies the default run's grids and curves to docs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "two white triangles"  # the default prompt of `dpok train` on the embedded model
# the defaults on other hard prompts: a count of four (the paper experiment's), the one held-out pair
# the base model ever draws (docs/SHAPEWORLD.md: 0.375), and another rare pair
OTHER_PROMPTS = ("four red squares", "an orange triangle", "two purple circles")
EVAL_SEED = 777


def _dpok(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "dpok", *args], check=True, env=env, cwd=ROOT)


def _folder(out: Path, prompt: str) -> Path:
    """The default prompt's results lie in ``out`` itself (as before other prompts were run)."""
    return out if prompt == PROMPT else out / "-".join(prompt.split())


def best_of_8(prompt: str, images: int, folder: Path) -> None:
    """Best-of-8 rejection sampling of the base model on ``prompt``: ``images`` images, each the best
    by the reward of 8 samples, judged like the others (``folder``/eval-best-of-8/row.json)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from dpok.config import build_config
    from dpok.evaluate import SampleSettings, evaluate_prompt
    from dpok.trainer import Trainer

    cfg = build_config(None, {"algorithm": "rejection-sampling", "best_of": 8, "prompt": [prompt], "rounds": 1,
                              "output_dir": str(folder / "best-of-8-run"), "eval_images": 1, "report_to": ["none"]})
    trainer = Trainer(cfg)
    generated = trainer.algorithm.generate([prompt] * images, torch.Generator().manual_seed(EVAL_SEED))
    settings = SampleSettings(images, cfg.num_steps, cfg.guidance_scale, 1.0)
    row, _ = evaluate_prompt(trainer.adapter, trainer.reward, prompt, settings, EVAL_SEED, trainer.domain, generated)
    (folder / "eval-best-of-8").mkdir(parents=True, exist_ok=True)
    (folder / "eval-best-of-8" / "row.json").write_text(json.dumps(row, indent=2) + "\n")


def run(out: Path, images: int, prompts: list[str], train_args: list[str]) -> None:
    if out.exists():
        shutil.rmtree(out)
    for prompt in dict.fromkeys([PROMPT, *prompts]):
        folder = _folder(out, prompt)
        t0 = time.perf_counter()
        _dpok("train", "--output-dir", str(folder / "run"), *(["--prompt", prompt] if prompt != PROMPT else []),
              *train_args)
        wall = time.perf_counter() - t0
        evaluate(folder, prompt, images)
        (folder / "timing.json").write_text(json.dumps({"train_wall_s": wall, "train_args": train_args}) + "\n")


def evaluate(folder: Path, prompt: str, images: int) -> None:
    """`dpok eval` of the base and of the run's LoRA, and best-of-8 of the base, on ``images`` images."""
    for name, lora in (("base", ""), ("tuned", str(folder / "run" / "lora"))):
        _dpok("eval", "--prompt", prompt, "--num-images", str(images), "--seed", str(EVAL_SEED), "--output-dir",
              str(folder / f"eval-{name}"), *(["--lora", lora] if lora else []))
    best_of_8(prompt, images, folder)


def evaluate_again(out: Path, images: int) -> None:
    """The evaluations of every run already in ``out`` again (e.g. after the measures changed), no training."""
    folders = [p for p in [out, *sorted(out.iterdir())] if (p / "run" / "lora").is_dir()]
    if not folders:
        raise SystemExit(f"no finished runs in {out}: run without --eval-only first")
    for folder in folders:
        evaluate(folder, (json.loads((folder / "run" / "config.json").read_text())["prompt"] or [PROMPT])[0], images)


def _evaluations(folder: Path, prompt: str) -> dict[str, dict[str, float]]:
    ev = {k: json.loads((folder / f"eval-{k}" / "eval.json").read_text())["splits"]["seen"]["prompts"][prompt]
          for k in ("base", "tuned")}
    best = folder / "eval-best-of-8" / "row.json"
    if best.is_file():
        ev["best-of-8"] = json.loads(best.read_text())
    return ev


def _run_summary(folder: Path) -> dict[str, float]:
    """Wall time, seconds per round and the smoothed training reward's first, best, last and largest fall."""
    from dpok.runlog import read_metrics
    from dpok.tuning import largest_drop, smoothed

    rows = read_metrics(folder / "run" / "metrics.jsonl")
    smooth = smoothed([r["reward/mean"] for r in rows])
    per_round = sum(r["time/sample_s"] + r["time/reward_s"] + r["time/update_s"] for r in rows) / len(rows)
    return {"wall": json.loads((folder / "timing.json").read_text())["train_wall_s"], "per_round": per_round,
            "first": smooth[0], "best": max(smooth), "last": smooth[-1], "drop": largest_drop(smooth)}


def report(out: Path, md: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from dpok.utils.machine import cpu_description

    cfg = json.loads((out / "run" / "config.json").read_text())
    run = _run_summary(out)
    ev = _evaluations(out, PROMPT)
    docs = md.parent
    for src, dst in (("samples_before.png", "default_samples_before.png"),
                     ("samples_after.png", "default_samples_after.png"), ("curves.png", "default_curves.png")):
        shutil.copyfile(out / "run" / src, docs / dst)
    n = json.loads((out / "eval-base" / "eval.json").read_text())["config"]["num_images"]
    extra = json.loads((out / "timing.json").read_text()).get("train_args", [])
    options = f"the options `{' '.join(extra)}` only" if extra else "no options"

    def row(label: str, e: dict[str, float]) -> str:
        kl = e["kl_to_base"]
        return (f"| {label} | {e['judge_aligned']:.3f} | {e['clean_share']:.3f} | {e['reward_mean']:.3f} | "
                f"{'–' if kl != kl else f'{kl:.1f}'} |")

    lines = [
        "# The default run, measured",
        "",
        f"Generated by `benchmarks/default_run.py`: `dpok train` with {options}, then `dpok eval` of the base",
        f"model and of the run's LoRA on `{PROMPT}` ({n} images each, the same noise for both), and best-of-8",
        "rejection sampling of the base model (each image the reward's best of 8 samples) for comparison.",
        "",
        f"- Machine: {cpu_description()}, {os.cpu_count()} cores.",
        f"- Settings: `{cfg['algorithm']}`, {cfg['rounds']} rounds x {cfg['samples_per_round']} samples "
        f"({cfg['rounds'] * cfg['samples_per_round']} reward queries), advantage `{cfg['advantage']}`, surrogate "
        f"`{cfg['surrogate']}`, clip {cfg['clip_range']}, lr {cfg['learning_rate']} "
        f"({cfg.get('lr_schedule', 'constant')} schedule), LoRA rank {cfg['lora_rank']} on "
        f"`{cfg['lora_targets']}`, trained steps {cfg['step_window_start']}–{cfg['step_window_end']} of the trajectory, "
        f"beta {cfg['beta']}.",
        f"- Wall time of `dpok train` (model loading and the before/after grids included): {run['wall'] / 60:.1f} min; "
        f"{run['per_round']:.1f} s per round.",
        f"- Training reward (5-round mean): first {run['first']:.3f}, best {run['best']:.3f}, last {run['last']:.3f}; "
        f"largest fall below its best {run['drop']:.3f}.",
        "",
        "| model | judge aligned | clean shapes | reward | KL to base (nats) |",
        "| --- | --- | --- | --- | --- |",
        row("base", ev["base"]),
        row("fine-tuned", ev["tuned"]),
        *([row("best-of-8 of the base", ev["best-of-8"])] if "best-of-8" in ev else []),
        "",
        "![Curves](default_curves.png)",
        "",
    ]
    others = sorted(p for p in out.iterdir() if (p / "eval-tuned" / "eval.json").is_file())
    if others:
        lines += [
            "## The same defaults on other prompts",
            "",
            f"`dpok train --prompt P` with {options} besides, evaluated as above. The tuning sweep chose the "
            "defaults on `four red squares` (docs/tuning.md)."
            + (" `an orange triangle` is a held-out pair, one the pretraining captions never contain "
               "(docs/SHAPEWORLD.md)." if any(p.name == "an-orange-triangle" for p in others) else ""),
            "",
            "| prompt | judge: base → fine-tuned | best-of-8 judge | clean shapes: base → fine-tuned | reward: base "
            "→ fine-tuned | training reward first / best / last, largest fall | wall time |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for folder in others:
            prompt = json.loads((folder / "run" / "config.json").read_text())["prompt"][0]
            e, r = _evaluations(folder, prompt), _run_summary(folder)
            best = f"{e['best-of-8']['judge_aligned']:.3f}" if "best-of-8" in e else "–"
            lines.append(
                f"| `{prompt}` | {e['base']['judge_aligned']:.3f} → **{e['tuned']['judge_aligned']:.3f}** | {best} | "
                f"{e['base']['clean_share']:.3f} → {e['tuned']['clean_share']:.3f} | {e['base']['reward_mean']:.3f} → "
                f"{e['tuned']['reward_mean']:.3f} | {r['first']:.3f} / {r['best']:.3f} / {r['last']:.3f}, "
                f"{r['drop']:.3f} | {r['wall'] / 60:.1f} min |")
        lines.append("")
    lines += flaw_table(out, [out, *others])
    md.write_text("\n".join(lines))
    return md


FLAWS = (("missing", "an object missing"), ("extra", "an extra object"), ("foreign", "a foreign colour or shape"),
         ("unrecognised", "an unrecognised blob"))


def flaw_table(out: Path, folders: list[Path]) -> list[str]:
    """Why the images failed the judge, per prompt and model (evaluations that hold the judge's flaws)."""
    rows = []
    for folder in folders:
        prompt = (json.loads((folder / "run" / "config.json").read_text())["prompt"] or [PROMPT])[0]
        labels = {"base": "base", "tuned": "fine-tuned", "best-of-8": "best-of-8 of the base"}
        for key, e in _evaluations(folder, prompt).items():
            label = labels[key]
            if "judge_missing" in e:
                rows.append(f"| `{prompt}` | {label} | {e['judge_aligned']:.3f} | "
                            + " | ".join(f"{e[f'judge_{k}']:.3f}" for k, _ in FLAWS) + " |")
    if not rows:
        return []
    return ["## Why images fail the judge", "",
            "Share of the evaluated images with each flaw the geometric judge finds (an image may have several; "
            "`dpok eval` reports them). A count the model overshoots shows as *extra*, one it falls short of as "
            "*missing*.", "",
            "| prompt | model | aligned | " + " | ".join(text for _, text in FLAWS) + " |",
            "| --- | --- | --- | " + " | ".join("---" for _ in FLAWS) + " |", *rows, ""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "default-run"))
    p.add_argument("--report", default=str(ROOT / "docs" / "default_run.md"))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--prompts", nargs="*", default=list(OTHER_PROMPTS),
                   help="other prompts to run the defaults on (none: the default prompt only)")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="extra `dpok train` options, last on the line (a quick check: --train-args --rounds 1); the "
                        "report is then not the default run's")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--eval-only", action="store_true", help="evaluate the runs in --output-dir again, no training")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    if args.eval_only:
        evaluate_again(out, args.images)
    elif not args.report_only:
        run(out, args.images, args.prompts, args.train_args)
    print(f"report: {report(out, Path(args.report))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
