"""The tuning sweep behind the embedded model's defaults, then docs/tuning.md.

    python benchmarks/tune.py                      # references, screening trials, confirmation of each method's
                                                   # best two, validation of the chosen settings, the report
    python benchmarks/tune.py --stage trials       # only the screening trials
    python benchmarks/tune.py --report-only        # rewrite docs/tuning.md from the finished trials
    python benchmarks/tune.py --explore dpok '{"surrogate": "ppo"}' --prompt "two white triangles"
                                                   # one ad-hoc trial, with the base model and best-of-8
                                                   # on its prompt (the report's exploration table)

Every method gets the same number of candidates (equal tuning care), each trained at the same
reward-query budget on the same prompts and seeds. Run it in the background (``nohup ... &``);
the same command continues after an interruption. ``--workers 2`` runs two trials at a time with
one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# in the order they depend on each other: the confirmation retrains the screening's best, the
# validation the confirmation's choice
STAGES = ("references", "trials", "confirmation", "validation")


# The one change of every method's optimisation that the exploration runs pointed to: a 5/3 larger
# step and LoRA rank 8 on the convolutions as well (the 16x16 down block has no attention).
BIGGER = (("learning_rate", 5e-4), ("lora_rank", 8), ("lora_alpha", 8.0),
          ("lora_targets", "to_q,to_k,to_v,to_out.0,conv1,conv2,proj_in,proj_out"))
# DDPO-IS at the defaults' minibatch (32 samples = the whole round) takes one optimizer step per
# round with the ratio always 1; 8 samples x 40 % of the window's steps give it 4 steps per round on
# about the transitions DPOK trains on (6 x 32)
DDPO = (("minibatch_size", 8), ("timestep_fraction", 0.4))


# The second round of the sweep, the same two candidates for every method: BIGGER at two and at
# four times the step of the first round's best (the exploration runs on `two white triangles`
# rose about twice as fast at lr 1e-3 and 2e-3 and levelled off at the same judge)
FASTER = BIGGER[1:] + (("learning_rate", 1e-3),)
FASTEST = BIGGER[1:] + (("learning_rate", 2e-3),)
# The third round, one more candidate for every method: exploration on `two white triangles` showed
# lr 2e-3 at a constant rate rising, then swinging between too few and too many objects (one and three
# triangles) until the last round; the same step decayed by a cosine over the run settles instead,
# and for the ratio-clipped methods a ten times wider band (1e-3) lets more than the first step of
# a round learn (clip fraction 0.8 at 1e-4)
DECAY = FASTEST + (("lr_schedule", "cosine"),)
WIDER = (("clip_range", 1e-3),)
# The fourth round, one more candidate for every method: the third round's decay at half its step.
# Exploration on DPOK (docs/tuning.md, judged on 256 images, three prompt-seed pairs) put lr 1e-3
# with the cosine decay ahead of 2e-3 on the judge in all three, with a third of the KL and no fall
# of the smoothed reward beyond 0.085; every method gets the same candidate
SLOWER_DECAY = FASTER + (("lr_schedule", "cosine"),)


# The newer methods' own starting points, as the paper experiment runs them: GRPO on DDPO-IS's
# per-round work (it shares DDPO-IS's update loop); DiffusionNFT with deterministic 10-step DDIM
# rollouts, the cheap sampler its paper recommends
NFT = (("rollout_steps", 10), ("rollout_eta", 0.0))


def candidates() -> dict[str, list]:
    """Seven candidates per method: its defaults, the same larger step for all, one knob of its own,
    the larger LoRA at lr 1e-3 and at lr 2e-3, then lr 2e-3 and lr 1e-3 with a cosine decay (and the
    wider ratio band for the methods that clip a ratio)."""
    from dpok.tuning import Candidate as C

    own = {"dpok": (), "ddpo-is": DDPO, "sft-kl": (), "rwr": (), "grpo": DDPO, "diffusion-nft": NFT}
    clipped = {"dpok": WIDER, "ddpo-is": WIDER, "grpo": WIDER}
    knob = {"dpok": C("clip3e-4", (("clip_range", 3e-4),)), "ddpo-is": C("clip3e-4", DDPO + (("clip_range", 3e-4),)),
            "sft-kl": C("gamma0.2", (("gamma", 0.2),)), "rwr": C("temp0.05", (("rwr_temperature", 0.05),)),
            # GRPO without the KL term (beta = 0), as DanceGRPO and many GRPO runs train
            "grpo": C("beta0", DDPO + (("beta", 0.0),)),
            # DiffusionNFT rolling out with the evaluation's sampler (20 stochastic steps) instead of 10
            # deterministic ones: what the cheaper sampler costs in alignment
            "diffusion-nft": C("eval-sampler", ())}
    return {m: [C("defaults", base), C("bigger", base + BIGGER), knob[m], C("lr1e-3", base + FASTER),
                C("lr2e-3", base + FASTEST), C("cosine", base + DECAY + clipped.get(m, ())),
                C("cosine-lr1e-3", base + SLOWER_DECAY + clipped.get(m, ()))]
            for m, base in own.items()}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=str(ROOT / "runs" / "tuning"))
    p.add_argument("--report", default=str(ROOT / "docs" / "tuning.md"))
    p.add_argument("--stage", choices=[*STAGES, "all"], default="all")
    p.add_argument("--rounds", type=int, default=None, help="rounds per trial (default: the sweep's)")
    p.add_argument("--methods", nargs="+", default=None, help="default: dpok ddpo-is sft-kl rwr grpo diffusion-nft")
    p.add_argument("--workers", type=int, default=1, help="trials at a time (threads are split between them)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--explore", nargs=2, metavar=("METHOD", "JSON"), help="one ad-hoc trial (in <output>/explore)")
    p.add_argument("--name", default="", help="name of the --explore trial (default: from its settings)")
    p.add_argument("--prompt", default="two white triangles", help="prompt of the --explore trial")
    p.add_argument("--seed", type=int, default=0, help="seed of the --explore trial")
    p.add_argument("--references", nargs="*", default=["base", "rejection-sampling"],
                   choices=["base", "rejection-sampling"],
                   help="references run beside an --explore trial on its prompt (best-of-8 costs 8 samples per image)")
    p.add_argument("--eval-images", type=int, default=0,
                   help="images the --explore trial (and its base and best-of-8) is judged on (default: the sweep's)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.eval_images < 0:
        p.error(f"--eval-images must be a number of images (0: the sweep's), got {args.eval_images}")
    if args.eval_images and not args.explore:
        # the sweep's trials are compared with each other: all are judged on the sweep's own number
        p.error("--eval-images applies to an --explore trial only; the sweep judges every trial on the same images")
    return args


def build(args: argparse.Namespace):  # noqa: ANN201
    from dpok.tuning import SweepConfig

    methods = candidates()
    if args.methods:
        methods = {m: methods[m] for m in args.methods}
    cfg = SweepConfig(output_dir=args.output_dir, methods=methods)
    if args.rounds:
        cfg.rounds = args.rounds
    if args.explore and args.eval_images:
        cfg.eval_images = args.eval_images
    return cfg


def explore(args: argparse.Namespace) -> None:
    from dpok.tuning import Candidate, Sweep, SweepConfig

    method, text = args.explore
    overrides = json.loads(text)
    name = args.name or ("-".join(f"{k}={v}" for k, v in overrides.items()) or "defaults")
    sweep = Sweep(build(args))
    folder = sweep.trial_dir("explore", method, name, args.prompt, args.seed)
    r = sweep.run_trial(folder, method, Candidate(name, tuple(overrides.items())), args.prompt, args.seed)
    print(json.dumps({k: r[k] for k in ("method", "candidate", "prompt", "smoothed_drop", "train_s")} | r["eval"]))
    # the base model and best-of-8 on the same prompt and noise, once, for the report's comparison
    # judged on other than the sweep's number of images: references of their own, on the same images
    default_images = SweepConfig().eval_images
    ref_name = "none" if sweep.cfg.eval_images == default_images else f"none-{sweep.cfg.eval_images}images"
    for reference in args.references:
        ref_dir = sweep.trial_dir("explore", reference, ref_name, args.prompt, args.seed)
        if not (ref_dir / "result.json").is_file():
            sweep.run_reference(ref_dir, reference, args.prompt, args.seed)


def seed_from_kept(out: Path, kept: Path) -> None:
    """Start an empty output folder from the raw results the report keeps (a fresh clone has only
    those): finished trials are not rerun, and later stages run from the same frozen base settings."""
    if not (out / "sweep.json").is_file() and (kept / "sweep.json").is_file():
        import shutil

        shutil.copytree(kept, out, dirs_exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from dpok.tuning import Sweep

    if args.explore:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.workers)))
        explore(args)
        return 0
    cfg = build(args)
    seed_from_kept(Path(cfg.output_dir), Path(args.report).with_suffix("") / "data")
    stages = list(STAGES) if args.stage == "all" else [args.stage]
    if not args.report_only:
        for stage in stages:
            if args.worker or args.workers <= 1:
                torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.workers)))
                Sweep(cfg, log=lambda m: print(time.strftime("%H:%M:%S"), m, flush=True)).run(stage)
            else:
                cmd = [sys.executable, __file__, "--worker", "--stage", stage, "--output-dir", args.output_dir,
                       "--workers", str(args.workers)]
                if args.rounds:
                    cmd += ["--rounds", str(args.rounds)]
                if args.methods:
                    cmd += ["--methods", *args.methods]
                procs = [subprocess.Popen(cmd) for _ in range(args.workers)]
                if any(p.wait() for p in procs):
                    return 1
        if args.worker:
            return 0
    from dpok.report_tuning import write_report

    path = write_report(Sweep(cfg), Path(args.report))
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
