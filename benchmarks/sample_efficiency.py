"""Reward per query: the independent judge against reward queries and seconds, per method and seed.

    python benchmarks/sample_efficiency.py                  # grpo, diffusion-nft, dpok, ddpo-is; 3 seeds
    python benchmarks/sample_efficiency.py --tasks color    # one task (the report then shows that task only)
    python benchmarks/sample_efficiency.py --report-only    # rewrite the report from the kept results

Each unit trains one method on one task of the paper experiment (the rare colour pair, the count of
four and the two-group composition by default)
with the experiment's own settings for that method (``dpok.experiment.default_methods``; with
``--method-settings tuned`` the setting its tuning sweep chose, into ``*_tuned`` folders), for
``--queries`` reward queries, and evaluates the policy every ``--eval-every`` rounds on fixed noise
(``--eval-every``: the geometric judge, which shares no weights with the reward, on
``--eval-images`` images). From those evaluations it reads the queries, and the training seconds
(sampling + scoring + update of the rounds before; evaluations, KL logging and start-up left out),
at which the judge's aligned share first reaches ``--target``. Units run seed by seed with the methods
in turn, so that a slower or busier stretch of the machine falls on every method alike; a finished
unit keeps ``result.json`` and is not run again (stop and rerun at any time); an empty output folder
starts from the units kept in ``docs/sample_efficiency/data.json`` whose recorded settings are still
the method's (so a fresh clone runs only what is missing). Writes
docs/sample_efficiency.md, its figure and docs/sample_efficiency/data.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("grpo", "diffusion-nft", "dpok", "ddpo-is")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--tasks", nargs="+", default=["color", "count", "composition"],
                   help="tasks of the paper experiment (single-prompt ones)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--queries", type=int, default=512, help="reward queries per unit")
    p.add_argument("--samples-per-round", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=2, help="rounds between evaluations")
    p.add_argument("--eval-images", type=int, default=16, help="images per evaluation")
    p.add_argument("--target", type=float, default=0.8, help="judge-aligned share the queries are counted to")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--method-settings", choices=["defaults", "tuned"], default="defaults",
                   help="'defaults': the paper experiment's settings for each method (the package defaults); 'tuned': "
                        "each method's setting chosen by the tuning sweep (docs/tuning.md), as its trials ran it "
                        "(equal optimisation care; its own output folder and report, *_tuned)")
    p.add_argument("--output-dir", default="", help="default: runs/sample_efficiency[_tuned]")
    p.add_argument("--report", default="", help="default: docs/sample_efficiency[_tuned].md")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    suffix = "_tuned" if args.method_settings == "tuned" else ""
    args.output_dir = args.output_dir or str(ROOT / "runs" / f"sample_efficiency{suffix}")
    args.report = args.report or str(ROOT / "docs" / f"sample_efficiency{suffix}.md")
    if args.queries % args.samples_per_round or args.queries < args.samples_per_round:
        p.error(f"--queries ({args.queries}) must be a positive multiple of --samples-per-round "
                f"({args.samples_per_round})")
    return args


def first_reaching(evals: list[dict[str, Any]], target: float, key: str, held: bool = False) -> float | None:
    """``key`` of the first evaluation whose judge-aligned share is at least ``target`` (None: never);
    ``held``: and the next evaluation's too (a judge on a few images crosses a line by chance)."""
    ok = [e["judge"] is not None and e["judge"] >= target for e in evals]
    return next((e[key] for i, e in enumerate(evals) if ok[i] and (not held or (i + 1 < len(ok) and ok[i + 1]))),
                None)


def unit_result(run_dir: Path, samples: int, target: float) -> dict[str, Any]:
    """The evaluations of a finished run with the queries and training seconds spent before each."""
    from dpok.runlog import read_metrics

    rounds = read_metrics(run_dir / "metrics.jsonl")
    seconds = [0.0]
    for r in rounds:
        seconds.append(seconds[-1] + r["time/sample_s"] + r["time/reward_s"] + r["time/update_s"])
    evals = []
    for row in read_metrics(run_dir / "eval.jsonl"):
        n = int(row["round"])
        evals.append({"round": n, "queries": n * samples, "seconds": seconds[min(n, len(seconds) - 1)],
                      "judge": row.get("eval/seen/judge_aligned"), "clean": row.get("eval/seen/clean_share"),
                      "reward": row.get("eval/seen/reward_mean"), "kl": row.get("eval/seen/kl_to_base")})
    return {"evals": evals, "train_reward": [r["reward/mean"] for r in rounds],
            "queries_to_target": first_reaching(evals, target, "queries"),
            "seconds_to_target": first_reaching(evals, target, "seconds"),
            "queries_to_held_target": first_reaching(evals, target, "queries", held=True),
            "seconds_to_held_target": first_reaching(evals, target, "seconds", held=True),
            "seconds_per_round": statistics.median([b - a for a, b in zip(seconds, seconds[1:])]) if rounds else None}


# what a unit's recorded settings leave out: where it ran, not what it trained
UNRECORDED = ("output_dir", "resume")


def unit_folder(args: argparse.Namespace, task_name: str, method_name: str, seed: int) -> Path:
    return Path(args.output_dir) / task_name / method_name / f"seed-{seed}"


def unit_config(args: argparse.Namespace, task_name: str, method_name: str, seed: int):  # noqa: ANN201
    """The unit's TrainConfig (the paper experiment's settings for the method) and its task."""
    from dpok.experiment import Experiment, ExperimentConfig

    exp_cfg = ExperimentConfig(output_dir=str(args.output_dir), tasks=[task_name], methods=[method_name],
                               seeds=[seed], samples_per_round=args.samples_per_round,
                               method_settings=args.method_settings, tuning_dir=str(ROOT / "docs" / "tuning" / "data"))
    exp_cfg.validate()
    experiment = Experiment(exp_cfg, log=lambda *a: None)
    task = next(t for t in exp_cfg.all_tasks() if t.name == task_name)
    folder = unit_folder(args, task_name, method_name, seed)
    cfg = experiment.train_config(task, experiment.methods[method_name], seed, folder / "run",
                                  args.queries // args.samples_per_round,
                                  extra={"eval_every": args.eval_every, "eval_every_images": args.eval_images,
                                         "checkpoint_every": 4, "report_to": ["none"]})
    return cfg, task


def recorded_settings(cfg) -> dict[str, Any]:  # noqa: ANN001
    return {k: v for k, v in cfg.resolved().to_dict().items() if k not in UNRECORDED}


def run_unit(args: argparse.Namespace, task_name: str, method_name: str, seed: int) -> dict[str, Any]:
    import torch

    from dpok.trainer import Trainer
    from dpok.utils.machine import cpu_description

    folder = unit_folder(args, task_name, method_name, seed)
    done = folder / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    torch.set_num_threads(args.threads)
    cfg, task = unit_config(args, task_name, method_name, seed)
    print(f"== {task_name} / {method_name} / seed {seed}: {cfg.rounds} rounds x {args.samples_per_round} samples",
          flush=True)
    Trainer(cfg).run()
    result = {"task": task_name, "prompt": task.seen[0], "method": method_name, "seed": seed,
              "machine": cpu_description(), "threads": args.threads, "samples_per_round": args.samples_per_round,
              "settings": recorded_settings(cfg), **unit_result(folder / "run", args.samples_per_round, args.target)}
    done.write_text(json.dumps(result, indent=1))
    return result


def import_kept(args: argparse.Namespace) -> None:
    """Start an empty output folder from the report's kept raw results, so that only missing units
    run. A kept unit whose recorded settings differ from what the method trains with today, or whose
    task or method no longer exists, is left out (it runs again); units kept before settings were
    recorded are taken as they are (the kept data holds none whose method has changed since)."""
    kept = Path(args.report).parent / Path(args.report).stem / "data.json"
    if not kept.is_file() or collect(args):  # a folder with results of its own is left as it is
        return
    for result in json.loads(kept.read_text()):
        done = unit_folder(args, result["task"], result["method"], result["seed"]) / "result.json"
        if done.is_file() or result["samples_per_round"] != args.samples_per_round:
            continue
        if "settings" in result:
            try:
                now = recorded_settings(unit_config(args, result["task"], result["method"], result["seed"])[0])
            except (ValueError, StopIteration):  # the task or method is gone
                print(f"kept {result['task']} / {result['method']} is no longer a unit of the benchmark: left out")
                continue
            changed = sorted(k for k in now if result["settings"].get(k) != now[k])
            if changed:
                print(f"kept {result['task']} / {result['method']} / seed {result['seed']} is stale "
                      f"({', '.join(changed)} changed): it runs again", flush=True)
                continue
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(result, indent=1))


def collect(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(Path(args.output_dir).glob("*/*/seed-*/result.json"))]


def _fmt(values: list[float | None], digits: int = 0) -> str:
    got = [v for v in values if v is not None]
    if not got:
        return "not reached"
    text = f"{statistics.mean(got):.{digits}f}" + (f" ({min(got):.{digits}f}–{max(got):.{digits}f})" if len(got) > 1 else "")
    return text + (f", {len(values) - len(got)} of {len(values)} seeds not reached" if len(got) < len(values) else "")


def held(result: dict[str, Any], key: str, target: float) -> float | None:
    """Queries, or seconds, to the first evaluation at or above ``target`` whose next one is too. The
    seconds are the rounds to it times the unit's median seconds per round, which a busy stretch of a
    shared machine does not move as it moves a sum."""
    queries = first_reaching(result["evals"], target, "queries", held=True)
    if key == "queries" or queries is None:
        return queries
    return queries / result["samples_per_round"] * result["seconds_per_round"]


def judge_at(result: dict[str, Any], queries: int) -> float | None:
    """The judge at the last evaluation at or before ``queries``."""
    before = [e for e in result["evals"] if e["queries"] <= queries and e["judge"] is not None]
    return before[-1]["judge"] if before else None


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in results})
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.8 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        for method in sorted({r["method"] for r in results if r["task"] == task}):
            units = [r for r in results if r["task"] == task and r["method"] == method]
            for ax, key in zip(row, ("queries", "seconds")):
                for unit in units:
                    xs = [e[key] for e in unit["evals"]]
                    ys = [e["judge"] for e in unit["evals"]]
                    ax.plot(xs, ys, alpha=0.35, color=f"C{sorted(METHODS).index(method) if method in METHODS else 5}")
                grid = sorted({e["queries"] for u in units for e in u["evals"]})
                if key == "queries":
                    means = [statistics.mean([judge_at(u, q) or 0.0 for u in units]) for q in grid]
                    ax.plot(grid, means, lw=2.2, label=method,
                            color=f"C{sorted(METHODS).index(method) if method in METHODS else 5}")
        for ax, key in zip(row, ("reward queries", "training seconds (sampling, scoring, update)")):
            ax.axhline(0.8, ls=":", color="gray")
            ax.set_xlabel(key)
            ax.set_ylabel("judge: aligned share")
            ax.set_title(f"{task}: {results[0]['prompt'] if len(tasks) == 1 else task}")
            ax.set_ylim(-0.02, 1.02)
        row[0].legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args: argparse.Namespace, results: list[dict[str, Any]], kept: list[dict[str, Any]]) -> str:
    """The report of ``results``; every finished unit (``kept``, all tasks and methods) goes to its raw data."""
    report = Path(args.report)
    data = report.parent / report.stem / "data.json"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(kept, indent=1))
    figure = report.parent / report.stem / "judge_vs_queries.png"
    plot(results, figure)
    machines = sorted({r["machine"] for r in results})
    lines = [
        "# Reward per query: the judge against reward queries and seconds",
        "",
        "Generated by `benchmarks/sample_efficiency.py` from the unit results it keeps (raw: "
        f"`docs/{report.stem}/data.json`). Machines: {'; '.join(machines)}; "
        f"{', '.join(sorted({str(r['threads']) for r in results}))} thread(s) per unit, one or two units at a time "
        "(the machine was shared with other work, so seconds are comparable between methods of a task run in "
        "turn on the same machine, not absolute).",
        "",
        f"Each unit trains one method with the paper experiment's settings for it, {results[0]['samples_per_round']} "
        "samples (reward queries) per round, and evaluates the policy on fixed noise every "
        f"{args.eval_every} rounds with the geometric judge ({args.eval_images} images; it shares no weights with "
        "the reward). Queries and training seconds (rounds times the unit's median seconds per round of sampling, "
        "scoring and update; evaluations, KL logging and start-up left out) are counted to the first evaluation "
        f"with a judge-aligned share of at least {args.target}, "
        "and ('held') to the first such evaluation whose next one is at or above it too: on "
        f"{args.eval_images} images the judge's standard error is about 0.1, so a single crossing can be chance. "
        "Mean over seeds, (min–max) in brackets.",
        "",
    ]
    for task in sorted({r["task"] for r in results}):
        units = [r for r in results if r["task"] == task]
        budget = max(e["queries"] for u in units for e in u["evals"])
        lines += [f"## {task}: `{units[0]['prompt']}`", "",
                  f"| method | seeds | judge before | judge at {budget // 2} | judge at {budget} | queries to {args.target} "
                  f"| queries to {args.target}, held | seconds to {args.target}, held | s/round | clean at {budget} |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for method in [m for m in METHODS if any(u["method"] == m for u in units)] + sorted(
                {u["method"] for u in units} - set(METHODS)):
            mine = [u for u in units if u["method"] == method]
            lines.append(" | ".join([
                f"| {method}", str(len(mine)),
                _fmt([judge_at(u, 0) for u in mine], 3), _fmt([judge_at(u, budget // 2) for u in mine], 3),
                _fmt([judge_at(u, budget) for u in mine], 3),
                _fmt([u["queries_to_target"] for u in mine]), _fmt([held(u, "queries", args.target) for u in mine]),
                _fmt([held(u, "seconds", args.target) for u in mine], 1),
                _fmt([u["seconds_per_round"] for u in mine], 1),
                _fmt([u["evals"][-1]["clean"] for u in mine], 3)]) + " |")
        ran_on = {m: sorted({u["machine"] for u in units if u["method"] == m}) for m in sorted({u["method"] for u in units})}
        if len({machine for ms in ran_on.values() for machine in ms}) > 1:
            lines += ["", "Units of this task ran on more than one machine, so their seconds compare only between "
                      "methods on the same one: " + "; ".join(f"{m}: {', '.join(ms)}" for m, ms in ran_on.items()) + "."]
        lines += ["", *ratio_lines(units, args.target, budget), ""]
    lines += [f"![judge against queries and seconds]({report.stem}/judge_vs_queries.png)", ""]
    text = "\n".join(lines)
    report.write_text(text)
    return text


def ratio_lines(units: list[dict[str, Any]], target: float, budget: int) -> list[str]:
    """DiffusionNFT against GRPO on this world: queries and seconds to the target, else the judge at the budget."""
    def mean_of(method: str, key: str) -> float | None:
        got = [held(u, key, target) for u in units if u["method"] == method]
        return statistics.mean(got) if got and all(v is not None for v in got) else None

    if not {"grpo", "diffusion-nft"} <= {u["method"] for u in units}:
        return []
    out = []
    for key, unit in (("queries", "queries"), ("seconds", "training seconds")):
        g, n = mean_of("grpo", key), mean_of("diffusion-nft", key)
        if g is not None and n is not None and n > 0:
            out.append(f"- DiffusionNFT against GRPO, {unit} to {target} held: GRPO / DiffusionNFT = {g / n:.2f}x.")
        else:
            out.append(f"- DiffusionNFT against GRPO, {unit} to {target} held: not measurable (a seed of "
                       f"{'GRPO' if g is None else 'DiffusionNFT'} did not reach {target} within {budget} queries).")
    jg = [judge_at(u, budget) for u in units if u["method"] == "grpo"]
    jn = [judge_at(u, budget) for u in units if u["method"] == "diffusion-nft"]
    if all(v is not None for v in jg + jn):
        out.append(f"- Judge at {budget} queries: GRPO {statistics.mean(jg):.3f}, DiffusionNFT {statistics.mean(jn):.3f}.")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import_kept(args)
    if not args.report_only:
        for seed in args.seeds:
            for task in args.tasks:
                for method in args.methods:
                    result = run_unit(args, task, method, seed)
                    reached = result["queries_to_target"]
                    print(f"   judge {[e['judge'] for e in result['evals']]}; queries to {args.target}: "
                          f"{reached if reached is not None else 'not reached'}", flush=True)
    kept = collect(args)
    results = [r for r in kept if r["method"] in args.methods and r["task"] in args.tasks]
    if not results:
        print("no finished units yet")
        return 1
    print(write_report(args, results, kept))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
