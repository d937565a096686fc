"""Round time with the reward scored in line (``--reward-overlap off``) and beside the sampling (``on``).

The reward sleeps as long as sampling one batch takes (measured first: the median of a few
batches), like a remote reward whose server answers in the time the sampler needs for one batch;
it then scores each image by its mean pixel. One trainer on the embedded model runs its rounds
alternating the two modes (off, on, on, off, off, on, ...: each pair in the other order than the
last, after a warm-up round of each), so that the load of a shared machine falls on both alike.
Reported: each mode's median round time and phases, and the ratio on / off. Writes
``docs/reward_overlap.md`` and the raw numbers ``docs/reward_overlap/data.json``; nothing in the
report is typed by hand.

    python benchmarks/reward_overlap.py            # 16 samples x 20 steps a round, 4 pairs
    python benchmarks/reward_overlap.py --quick    # 10 steps, 3 pairs (about 1 minute on 2 cores)
    python benchmarks/reward_overlap.py --report-only  # rewrite the report from its data.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import cpu_info, describe_cpu, header

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dpok.config import build_config  # noqa: E402
from dpok.rewards.custom import CustomReward  # noqa: E402
from dpok.trainer import Trainer  # noqa: E402

PHASES = ("round_s", "sample_s", "kl_s", "reward_s", "reward_busy_s", "update_s")


class SleepingReward:
    """Waits ``seconds`` (a server's answer), then scores each image (B, 3, H, W) by its mean pixel."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        time.sleep(self.seconds)
        return images.mean(dim=(1, 2, 3))


def measure(args: argparse.Namespace) -> dict:
    reward = SleepingReward()
    settings = {"samples_per_round": args.samples, "sample_batch_size": args.batch, "num_steps": args.steps,
                "gradient_steps": args.gradient_steps, "eval_images": 1, "report_to": ["none"],
                "output_dir": str(ROOT / "runs" / f"benchmark-reward-overlap-{time.strftime('%Y%m%d-%H%M%S')}")}
    trainer = Trainer(build_config(None, settings), reward=CustomReward("python:sleeping", reward))
    cfg = trainer.cfg
    header(f"reward overlap: rounds of {cfg.samples_per_round} samples in batches of {cfg.sample_batch_size}, "
           f"{cfg.num_steps} steps, {cfg.gradient_steps} gradient steps")
    prompts = [trainer.prompts[0]] * cfg.sample_batch_size
    trainer.sample(prompts)  # warm-up
    batch_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        trainer.sample(prompts)
        batch_times.append(time.perf_counter() - t0)
    reward.seconds = statistics.median(batch_times)
    print(f"sampling one batch of {cfg.sample_batch_size}: {reward.seconds:.2f} s (median of 3); the reward sleeps "
          "as long per batch")
    rows = []
    order = ["off", "on"]
    for pair in range(args.pairs + 1):  # pair 0: warm-up of both modes, not counted
        for mode in order:
            trainer.parts.cfg.reward_overlap = mode
            t0 = time.perf_counter()
            m = trainer.train_round()
            row = {"mode": mode, "pair": pair, "round_s": time.perf_counter() - t0,
                   **{p: m[f"time/{p}"] for p in PHASES[1:]}}
            print(f"  pair {pair} {mode:3s}: round {row['round_s']:6.2f} s (sample {row['sample_s']:5.2f}, kl "
                  f"{row['kl_s']:4.2f}, waited for reward {row['reward_s']:5.2f} of {row['reward_busy_s']:5.2f}, "
                  f"update {row['update_s']:5.2f})" + ("  [warm-up]" if pair == 0 else ""))
            rows.append(row)
        order.reverse()
    counted = [r for r in rows if r["pair"] > 0]
    medians = {mode: {p: statistics.median(r[p] for r in counted if r["mode"] == mode) for p in PHASES}
               for mode in ("off", "on")}
    ratios = [on["round_s"] / off["round_s"] for off, on in
              ((next(r for r in counted if r["pair"] == k and r["mode"] == "off"),
                next(r for r in counted if r["pair"] == k and r["mode"] == "on")) for k in range(1, args.pairs + 1))]
    return {"cpu": cpu_info(), "torch": torch.__version__, "settings": {k: v for k, v in settings.items()
                                                                          if k != "output_dir"},
            "batches_per_round": cfg.samples_per_round // cfg.sample_batch_size, "batch_sample_s": batch_times,
            "reward_sleep_s": reward.seconds, "rounds": rows, "median": medians,
            "ratio_round_on_over_off": medians["on"]["round_s"] / medians["off"]["round_s"],
            "ratio_round_on_over_off_per_pair": ratios}


def report(data: dict, command: str) -> str:
    med, s = data["median"], data["settings"]
    names = {"round_s": "round", "sample_s": "sampling", "kl_s": "rollout KL logging",
             "reward_s": "waiting for the reward", "reward_busy_s": "reward calls (busy)", "update_s": "update"}
    table = "\n".join(f"| {names[p]} | {med['off'][p]:.2f} | {med['on'][p]:.2f} | {med['on'][p] / med['off'][p]:.2f} |"
                      for p in PHASES)
    pairs = ", ".join(f"{r:.2f}" for r in data["ratio_round_on_over_off_per_pair"])
    saved = med["off"]["round_s"] - med["on"]["round_s"]
    sampling = med["on"]["sample_s"] / med["off"]["sample_s"]
    return f"""# Rewards off the critical path: `--reward-overlap`

Written by `{command}`; the raw numbers (every round) are in `docs/reward_overlap/data.json`.

With `--reward-overlap on` a worker thread scores each sampling batch while the next one is sampled,
and the last one while the rollout KL is logged (`dpok/scoring.py`). Both modes make the same reward
calls, one per sampling batch in order, so the scores and the training are identical (tested bit for
bit: rewards, their order, `metrics.jsonl`, the LoRA); only the time differs. `auto`, the default,
turns it on for rewards that mostly wait or whose cost is unknown (`--reward http`, a
`module:function`, a Python function) when a round has more than one sampling batch per process.

Here the reward sleeps as long as sampling one batch takes ({data['reward_sleep_s']:.2f} s for \
{s['sample_batch_size']} images), like a reward server that answers in that time. A round is \
{s['samples_per_round']} samples in {data['batches_per_round']} batches, {s['num_steps']} DDIM steps and \
{s['gradient_steps']} gradient steps on the embedded model. Rounds alternate the modes (each pair in the
other order than the last) after a warm-up round of each; the table gives the medians over \
{len(data['ratio_round_on_over_off_per_pair'])} rounds of each mode.

CPU: {describe_cpu(data['cpu'])}; torch {data['torch']}.

| phase (median s) | off | on | on / off |
| --- | --- | --- | --- |
{table}

The round takes **{data['ratio_round_on_over_off']:.2f}x** the time with overlap (per pair: {pairs}),
{saved:.2f} s less per round. Without overlap the round waits for every batch's scoring; with it only
for the part of the last batch's scoring that the KL logging did not hide, while the reward calls
themselves take as long as before. The sampling took {sampling:.2f}x its in-line time with the worker
beside it: the worker runs torch on one intra-op thread, since its own OpenMP team would spin on the
cores the sampling uses. A reward that computes on the same CPU cores would still compete with the
sampling, which is why `auto` leaves local rewards in line.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 steps, 3 pairs of rounds")
    parser.add_argument("--samples", type=int, default=16, help="samples per round")
    parser.add_argument("--batch", type=int, default=4, help="sampling batch size")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--gradient-steps", type=int, default=2, help="gradient steps per round")
    parser.add_argument("--pairs", type=int, default=4, help="rounds of each mode (after a warm-up of each)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no report")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from its data.json")
    args = parser.parse_args(argv)
    command = "python benchmarks/reward_overlap.py" + (" --quick" if args.quick else "")
    data_file = ROOT / "docs" / "reward_overlap" / "data.json"
    if args.report_only:
        data = json.loads(data_file.read_text())
        (ROOT / "docs" / "reward_overlap.md").write_text(report(data, data.get("command", command)))
        return 0
    if args.quick:
        args.steps, args.pairs = 10, 3
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = measure(args)
    print(f"CPU: {describe_cpu(data['cpu'])}")
    for mode in ("off", "on"):
        m = data["median"][mode]
        print(f"median {mode:3s}: round {m['round_s']:.2f} s, sample {m['sample_s']:.2f}, waited for reward "
              f"{m['reward_s']:.2f}, update {m['update_s']:.2f}")
    print(f"round time on / off: {data['ratio_round_on_over_off']:.2f}x")
    if not args.no_write:
        data["command"] = command
        data_file.parent.mkdir(parents=True, exist_ok=True)
        data_file.write_text(json.dumps(data, indent=2) + "\n")
        (ROOT / "docs" / "reward_overlap.md").write_text(report(data, command))
        print("wrote docs/reward_overlap.md and docs/reward_overlap/data.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
