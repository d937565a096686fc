"""The paper experiment on the embedded model, then docs/results.md.

    python benchmarks/paper_experiment.py                 # the full experiment (about 2 h on 2 cores), then the report
    python benchmarks/paper_experiment.py --quick         # minutes: two methods, one seed, two rounds
    python benchmarks/paper_experiment.py --report-only   # rewrite the report from the finished units

Run it in the background (``nohup ... &``); run the same command again to continue after an
interruption: finished units are kept, unfinished ones resume from their checkpoints. Several
worker processes share the jobs (``--workers``, default 2 on a machine with at least 2 cores).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


QUICK = {"tasks": ["count", "multi"], "methods": ["base", "dpok"], "seeds": [0], "rounds": 2, "samples_per_round": 8,
         "num_steps": 5, "eval_images": 4, "multi_eval_images": 2, "overopt_rounds": 2, "overopt_eval_every": 1,
         "overopt_eval_images": 4, "train_overrides": {"sample_batch_size": 8, "minibatch_size": 8, "gradient_steps": 2}}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from dpok.cli import add_config_option, add_dataclass_options
    from dpok.experiment import ExperimentConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_option(p)
    add_dataclass_options(p, ExperimentConfig, skip=("custom_seen", "custom_unseen"))
    p.add_argument("--report", default=str(ROOT / "docs" / "results.md"), help="markdown report to write")
    p.add_argument("--seen-prompt-file", default="", help="your own training prompts (one task named 'custom')")
    p.add_argument("--unseen-prompt-file", default="", help="your own held-out prompts for the custom task")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--quick", action="store_true", help="a tiny version (two methods, one seed, two rounds)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--raw-dir", default=str(ROOT / "docs" / "results" / "data"),
                   help="where the report's raw results (JSON) are kept, beside the report ('': not kept)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one worker process
    return p.parse_args(argv)


def build(args: argparse.Namespace):  # noqa: ANN201
    """The validated experiment settings: defaults, --quick's sizes, the config file, the options given."""
    from dpok.cli import errors_located, settings
    from dpok.experiment import ExperimentConfig
    from dpok.options import from_options
    from dpok.prompts import load_prompt_file

    given, source = settings(args, ExperimentConfig)
    values = {"output_dir": str(ROOT / "runs" / "paper_experiment"), **(QUICK if args.quick else {}), **given}
    with errors_located(source):
        cfg = from_options(ExperimentConfig, values)
        domain = cfg.domain()
        if args.seen_prompt_file:
            cfg.custom_seen = load_prompt_file(args.seen_prompt_file, domain)
            cfg.custom_unseen = load_prompt_file(args.unseen_prompt_file, domain) if args.unseen_prompt_file else []
            cfg.tasks = ["custom"]
        cfg.validate()
    return cfg


def forward_args(argv: list[str]) -> list[str]:
    return [a for a in argv if a != "--report-only"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    from dpok.experiment import Experiment
    from dpok.report import write_report

    cfg = build(args)
    if args.worker:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.workers)))
        Experiment(cfg, log=lambda m: print(f"[worker {os.getpid()}] {m}", flush=True)).run()
        return 0
    if not args.report_only:
        if args.raw_dir:
            seeded = seed_from_kept(Path(cfg.output_dir), Path(args.raw_dir), cfg)
            if seeded:
                print(f"continuing from {seeded} result file(s) kept in {args.raw_dir}")
        exp = Experiment(cfg)
        exp.write_meta()
        t0 = time.perf_counter()
        if args.workers <= 1:
            exp.run()
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), *forward_args(argv), "--worker"]
            procs = [subprocess.Popen(cmd) for _ in range(args.workers)]
            codes = [p.wait() for p in procs]
            if any(codes):
                print(f"a worker failed (exit codes {codes}); run the same command again to continue", file=sys.stderr)
                return 1
        print(f"experiment: {time.perf_counter() - t0:.0f} s; finished: {exp.finished()}")
    path = write_report(cfg.output_dir, args.report, raw_dir=in_repository(args.raw_dir or "docs/results/data"),
                        report_path=in_repository(args.report))
    print(f"wrote {path}")
    if args.raw_dir and Path(args.raw_dir).resolve() != Path(cfg.output_dir).resolve():
        raw = Path(args.raw_dir)
        if Experiment(cfg).finished() or same_settings(raw, cfg):
            # a whole experiment replaces what was kept; a partial one of the same settings extends it
            # (its folder was seeded from the kept results), so the next clone continues from there
            print(f"kept {keep_raw(Path(cfg.output_dir), raw)} raw result file(s) in {args.raw_dir}")
        else:  # a partial experiment does not replace the kept results of another one
            print(f"not every job has finished and {args.raw_dir} holds another experiment's results: "
                  "they are left as they are")
    return 0


def in_repository(path: str) -> str:
    """``path`` relative to the repository (as a report names it), or only its name when outside it."""
    p = Path(path).resolve()
    return p.relative_to(ROOT).as_posix() if p.is_relative_to(ROOT) else p.name


def kept_settings(folder: Path) -> dict | None:
    """The settings (all but the output folder) of the experiment whose results ``folder`` holds."""
    import json

    meta = folder / "experiment.json"
    if not meta.is_file():
        return None
    config = dict(json.loads(meta.read_text())["config"])
    config.pop("output_dir", None)
    return config


def same_settings(raw: Path, cfg) -> bool:  # noqa: ANN001 - an ExperimentConfig
    """Whether ``raw`` is empty or holds results of an experiment with ``cfg``'s settings."""
    import json

    from dpok.experiment import ExperimentConfig
    from dpok.options import to_options

    kept = kept_settings(raw)
    if kept is None:
        return not raw.exists() or not any(raw.iterdir())
    # where units may be copied from does not change what they are (a copy ran with the same settings)
    plain = lambda c: json.loads(json.dumps({k: v for k, v in to_options(c).items()  # noqa: E731
                                             if k not in ("output_dir", "reuse_units_from")}))
    # a setting added after the results were kept had its default's meaning then (method_settings:
    # "defaults" is how every earlier experiment set its methods)
    kept.pop("reuse_units_from", None)
    return {**plain(ExperimentConfig()), **kept} == plain(cfg)


def seed_from_kept(out: Path, raw: Path, cfg) -> int:  # noqa: ANN001 - an ExperimentConfig
    """Start an output folder that has no results yet from the results kept in ``raw`` when they
    are of the same experiment (a fresh clone has only those): finished units are not rerun, an
    over-optimisation run continues after its last kept evaluation. Returns the files copied."""
    import shutil

    if (out / "experiment.json").is_file() or kept_settings(raw) is None or not same_settings(raw, cfg):
        return 0
    files = [f for f in raw.rglob("*") if f.is_file() and f.name != "experiment.json"]
    for f in files:
        (out / f.relative_to(raw)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out / f.relative_to(raw))
    return len(files)


def keep_raw(out: Path, raw: Path) -> int:
    """Copy the experiment's JSON results (its settings, each unit's result, each over-optimisation
    run's points) from ``out`` into ``raw``, replacing what was there: the report can be rewritten
    from them (``--report-only --output-dir RAW``) on a clone that has no run folders."""
    import shutil

    files = [out / "experiment.json", *out.glob("units/*/*/seed*/result.json"), *out.glob("overopt/beta*/points.jsonl")]
    if raw.exists():
        shutil.rmtree(raw)
    for f in files:
        if f.is_file():
            (raw / f.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, raw / f.relative_to(out))
    return sum(f.is_file() for f in files)


if __name__ == "__main__":
    sys.exit(main())
