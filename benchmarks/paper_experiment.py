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


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "paper_experiment"), help="outcome folder")
    p.add_argument("--report", default=str(ROOT / "docs" / "results.md"), help="markdown report to write")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tasks", nargs="+", default=None, help="color count composition multi (default: all)")
    p.add_argument("--methods", nargs="+", default=None, help="default: all")
    p.add_argument("--rounds", type=int, default=None, help="rounds per trained unit")
    p.add_argument("--overopt-rounds", type=int, default=None, help="rounds of each over-optimisation run (0: skip)")
    p.add_argument("--model", default="shapeworld", help="pipeline folder or hub id (default: the embedded model)")
    p.add_argument("--reward", default="shapeworld-alignment", help="reward name or spec")
    p.add_argument("--alignment-model", default="", help="folder of the shapeworld-alignment weights")
    p.add_argument("--reward-model", default="", help="hub id or folder of the reward's model (see docs/rewards.md)")
    p.add_argument("--seen-prompt-file", default="", help="your own training prompts (one task named 'custom')")
    p.add_argument("--unseen-prompt-file", default="", help="your own held-out prompts for the custom task")
    p.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda[:N]'")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--quick", action="store_true", help="a tiny version (two methods, one seed, two rounds)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one worker process
    return p.parse_args(argv)


def build(args: argparse.Namespace):  # noqa: ANN201
    from dpok.experiment import ExperimentConfig
    from dpok.prompts import load_prompt_file

    cfg = ExperimentConfig(output_dir=args.output_dir, seeds=args.seeds, model=args.model, reward=args.reward,
                           alignment_model=args.alignment_model, reward_model=args.reward_model, device=args.device)
    grammar = "shapeworld" if args.model == "shapeworld" else None
    if args.seen_prompt_file:
        cfg.custom_seen = load_prompt_file(args.seen_prompt_file, grammar)
        cfg.custom_unseen = load_prompt_file(args.unseen_prompt_file, grammar) if args.unseen_prompt_file else []
        cfg.tasks = ["custom"]
    if args.quick:
        cfg.tasks, cfg.methods, cfg.seeds = ["count", "multi"], ["base", "dpok"], [0]
        cfg.rounds, cfg.samples_per_round, cfg.num_steps, cfg.eval_images, cfg.multi_eval_images = 2, 8, 5, 4, 2
        cfg.overopt_rounds, cfg.overopt_eval_every, cfg.overopt_eval_images = 2, 1, 4
        cfg.train_overrides = {"sample_batch_size": 8, "minibatch_size": 8, "gradient_steps": 2}
    if args.tasks:
        cfg.tasks = args.tasks
    if args.methods:
        cfg.methods = args.methods
    if args.rounds is not None:
        cfg.rounds = args.rounds
    if args.overopt_rounds is not None:
        cfg.overopt_rounds = args.overopt_rounds
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
    path = write_report(cfg.output_dir, args.report)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
