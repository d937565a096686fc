"""Time of one training round of every registered algorithm, phase by phase, against the bare
compute of its networks on the same batches; writes docs/round_breakdown.md and
docs/round_breakdown/data.json.

For each algorithm (read from the registry) one trainer on the embedded model (or ``--model``, a
Stable Diffusion 1.x/2.x pipeline folder) runs a warm-up round and then ``--rounds`` rounds; each
round's phases come from its metrics: sampling, rollout KL logging, reward (the wait for the
scores), update, and other (the rest of the round: prompt draws, statistics, bookkeeping). While
the rounds run, hooks on the UNet, the VAE decoder and the text encoder record every call: the
network, the phase it falls in, its batch size and whether gradients are on. The bare compute of a
phase is then what the same calls cost alone: a UNet forward of each recorded batch size (under
``no_grad``) for calls without gradients, a forward and a backward through the trainable weights
for calls with them, a decode of each recorded batch of latents and an encoding of each recorded
batch of prompts, each timed on inputs of the same shapes (median of 3). The bare calls are timed
right after each round, so that the load of a shared machine falls on both alike. Two ratios
(medians over the rounds): phase / bare UNet, and phase / bare compute of all its networks; the
second is the overhead of the RL machinery around the networks (target: 1.05x).

    python benchmarks/round_breakdown.py            # the default round (32 samples x 20 steps), 2 rounds each
    python benchmarks/round_breakdown.py --quick    # 16 samples x 10 steps, 1 round each: a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import cpu_info, describe_cpu, header, peak_memory_mb, timeit  # noqa: E402

from dpok.algorithms import ALGORITHMS  # noqa: E402
from dpok.config import build_config  # noqa: E402
from dpok.trainer import Trainer  # noqa: E402

PHASES = ("sampling", "kl", "reward", "update", "other")
NETWORKS = ("unet", "decode", "text")
METRIC = {"sampling": "time/sample_s", "kl": "time/kl_s", "reward": "time/reward_s", "update": "time/update_s"}
TITLES = {"sampling": "sampling", "kl": "KL logging", "reward": "reward", "update": "update", "other": "other"}


class NetworkCalls:
    """Counts the calls of the networks per (network, phase, batch size, gradients on) while ``phase``
    is set: the UNet, the VAE's decoder (latents to images) and the text encoder."""

    def __init__(self, adapter: Any) -> None:
        self.phase = ""
        self.calls: Counter[tuple[str, str, int, bool]] = Counter()
        modules = {"unet": adapter.unet, "decode": adapter.vae.decoder, "text": adapter.text_encoder}
        self.handles = [m.register_forward_pre_hook(self._hook(net), with_kwargs=True) for net, m in modules.items()]

    def _hook(self, network: str) -> Any:
        def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self.phase:
                # the batched input: the first tensor the call is given
                first = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
                self.calls[(network, self.phase, int(first.shape[0]), torch.is_grad_enabled())] += 1

        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def within(self, phase: str, fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.phase = phase
            try:
                return fn(*args, **kwargs)
            finally:
                self.phase = ""

        return wrapped


def _unet_seconds(unet: torch.nn.Module, adapter: Any, x: torch.Tensor, cond: torch.Tensor, grad: bool) -> float:
    """Median seconds of a UNet forward on ``x`` (B, C, h, w) and ``cond`` (B, L, D): under ``no_grad``,
    or with ``grad`` followed by a backward through the trainable weights."""
    t = torch.full((x.shape[0],), 500, device=x.device)
    if not grad:
        with torch.no_grad():
            return timeit(lambda: unet(x, t, cond).sample, 3)

    def fwd_bwd() -> None:
        unet(x, t, cond).sample.square().mean().backward()

    seconds = timeit(fwd_bwd, 3)
    for p in adapter.trainable_parameters():
        p.grad = None
    return seconds


def _other_network_seconds(adapter: Any, network: str, batch: int) -> float:
    """Median seconds of a no-grad VAE decode of ``batch`` latents, or of encoding ``batch`` prompts."""
    c, h, w = adapter.latent_shape
    if network == "decode":
        z = torch.randn(batch, c, h, w, device=adapter.device)
        return timeit(lambda: adapter.decode(z), 3)
    ids = adapter.tokenizer([""] * batch, padding="max_length", max_length=adapter.tokenizer.model_max_length,
                            return_tensors="pt").input_ids.to(adapter.device)
    with torch.no_grad():
        return timeit(lambda: adapter.text_encoder(ids), 3)


def bare_seconds(trainer: Trainer, calls: Counter[tuple[str, str, int, bool]],
                 rounds: int) -> dict[str, dict[str, float]]:
    """Per network ("unet", "decode", "text") and phase, the seconds the recorded calls of one round
    take alone (see the module docstring)."""
    adapter = trainer.adapter
    c, h, w = adapter.latent_shape
    cond = adapter.encode_prompts([trainer.prompts[0]]).cond
    cost: dict[tuple[str, int, bool], float] = {}
    for network, _, batch, grad in calls:
        if (network, batch, grad) in cost:
            continue
        cost[(network, batch, grad)] = (
            _unet_seconds(adapter.unet, adapter, torch.randn(batch, c, h, w, device=adapter.device),
                          cond.expand(batch, -1, -1), grad)
            if network == "unet" else _other_network_seconds(adapter, network, batch))
    out = {network: dict.fromkeys(("sampling", "kl", "update"), 0.0) for network in NETWORKS}
    for (network, phase, batch, grad), n in calls.items():
        out[network][phase] += n * cost[(network, batch, grad)] / rounds
    return out


def measure(name: str, settings: dict[str, Any], rounds: int, runs_dir: Path) -> dict[str, Any]:
    cfg = build_config(None, {**settings, "algorithm": name,
                              "output_dir": str(runs_dir / f"benchmark-round-{name}-{time.strftime('%H%M%S')}")})
    trainer = Trainer(cfg)
    cfg = trainer.cfg
    calls = NetworkCalls(trainer.adapter)
    trainer.sample = calls.within("sampling", trainer.sample)
    trainer.rollout_kl = calls.within("kl", trainer.rollout_kl)
    trainer.algorithm.update = calls.within("update", trainer.algorithm.update)
    rows, bares, net_bares, decodes, per_round_calls = [], [], [], [], Counter()
    for r in range(rounds + 1):
        calls.calls.clear()
        t0 = time.perf_counter()
        m = trainer.train_round()
        total = time.perf_counter() - t0
        row = {p: m[METRIC[p]] for p in METRIC}
        row["other"] = total - sum(row.values())
        row["round"] = total
        print(f"  {name} round {r}: " + ", ".join(f"{p} {row[p]:.2f}" for p in (*PHASES, "round"))
              + (" [warm-up]" if r == 0 else ""))
        if r == 0:  # the first round includes one-off warm-up
            continue
        rows.append(row)
        # the bare calls right after their round: a shared machine's load falls on both alike
        per_network = bare_seconds(trainer, calls.calls, 1)
        bares.append(per_network["unet"])
        net_bares.append({p: sum(per_network[n][p] for n in NETWORKS) for p in per_network["unet"]})
        decodes.append(per_network["decode"]["sampling"])
        per_round_calls.update(calls.calls)
    med = {p: statistics.median(row[p] for row in rows) for p in (*PHASES, "round")}
    bare = {p: statistics.median(b[p] for b in bares) for p in bares[0]}
    ratios = {p: statistics.median(row[p] / b[p] for row, b in zip(rows, bares)) if bare[p] > 0 else None
              for p in bare}
    net_bare = {p: statistics.median(b[p] for b in net_bares) for p in net_bares[0]}
    net_ratios = {p: statistics.median(row[p] / b[p] for row, b in zip(rows, net_bares)) if net_bare[p] > 0
                  else None for p in net_bare}
    calls.calls = per_round_calls
    steps, eta = trainer.algorithm.rollout_sampler()
    result = {"seconds": med, "bare_unet_seconds": bare, "ratio_to_bare": ratios,
              "bare_network_seconds": net_bare, "ratio_to_networks": net_ratios,
              "bare_decode_seconds": statistics.median(decodes),
              "network_calls_per_round": {f"{p}/{net}/batch {b}/{'fwd+bwd' if g else 'fwd'}": n / rounds
                                          for (net, p, b, g), n in sorted(calls.calls.items())},
              "round_settings": {"samples_per_round": cfg.samples_per_round, "sample_batch_size": cfg.sample_batch_size,
                                 "rollout_steps": steps, "rollout_eta": eta, "gradient_steps": cfg.gradient_steps,
                                 "grad_accum": cfg.grad_accum, "minibatch_size": cfg.minibatch_size,
                                 "trains": trainer.algorithm.trains}}
    calls.remove()
    del trainer
    gc.collect()
    return result


def _ratio(x: float | None) -> str:
    return f"{x:.2f}x" if x is not None else "–"


def report(data: dict[str, Any], command: str) -> str:
    s = data["settings"]
    rows = []
    for name, r in data["algorithms"].items():
        sec, ratio, net = r["seconds"], r["ratio_to_bare"], r["ratio_to_networks"]
        rows.append(f"| `{name}` | {sec['round']:.2f} | {sec['sampling']:.2f} ({_ratio(ratio['sampling'])}; "
                    f"{_ratio(net['sampling'])}) | "
                    f"{sec['kl']:.2f} ({_ratio(ratio['kl'])}) | {sec['reward']:.2f} | "
                    f"{sec['update']:.2f} ({_ratio(ratio['update'])}) | {sec['other']:.2f} |")
    table = "\n".join(rows)
    def worst(key: str, phase: str) -> str:
        found = [(r[key][phase], n) for n, r in data["algorithms"].items() if r[key][phase] is not None]
        return f"{max(found)[0]:.2f}x (`{max(found)[1]}`)" if found else "–"

    decode = statistics.median(r["bare_decode_seconds"] for r in data["algorithms"].values())
    return f"""# One training round, phase by phase, for every algorithm

Written by `{command}`; the raw numbers (the network calls of each phase, the bare times, the settings
of each algorithm's round) are in `docs/round_breakdown/data.json`.

Each algorithm ran its default settings on `{s.get('model', 'shapeworld')}` with {s['samples_per_round']} samples per
round and {s['num_steps']} DDIM steps: a warm-up round, then {data['rounds']} round(s) whose median is
shown. Seconds per round (median); in brackets the ratio to the bare UNet compute of the same calls: a
forward of each recorded batch size for the sampling and the KL logging (the policy and the
reference model), a forward and backward through the trainable weights for the update's calls with
gradients plus a forward for its calls without (reference model, old policy). Sampling also runs
the text encoder and decodes its latents with the VAE; its second ratio is to the bare compute of
all three networks' calls (the VAE decode's share alone: {decode:.2f} s a round), which leaves the RL
machinery around them (the step's mean, noise, log-prob, guidance, bookkeeping). *Reward* is the wait
for the scores (`shapeworld-alignment`, in line), *other* the rest of the round (prompts, statistics,
bookkeeping). `rejection-sampling` trains nothing; its round is sampling and scoring.

CPU: {describe_cpu(data['cpu'])}; torch {data['torch']}; peak memory {data['peak_memory_mb']:.0f} MB.

| algorithm | round | sampling | KL logging | reward | update | other |
| --- | --- | --- | --- | --- | --- | --- |
{table}

Largest ratios to the bare UNet: sampling {worst('ratio_to_bare', 'sampling')}, update
{worst('ratio_to_bare', 'update')}; sampling against all its networks:
{worst('ratio_to_networks', 'sampling')} (the target is 1.05x). On a machine shared with
other work the ratios move from run to run; the bare calls are timed right after each round, in the
same process, and the ratio is the median over the rounds. A ratio below 1 is not a phase faster than its network: the bare
calls run the UNet with its LoRA layers, while calls of the reference model (the KL logging's
second forward, SFT-KL's samples of the pretrained model) run it with the adapter disabled.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 samples x 10 steps a round, 1 round each")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds per algorithm (after a warm-up)")
    parser.add_argument("--algorithm", action="append", default=None,
                        help="only this algorithm (repeatable; default: every registered one)")
    parser.add_argument("--no-write", action="store_true", help="print only; write no report")
    parser.add_argument("--model", default="", help="a Stable Diffusion 1.x/2.x pipeline folder (default: the "
                                                    "embedded model)")
    parser.add_argument("--samples", type=int, default=0, help="samples per round (default: the algorithm's)")
    parser.add_argument("--steps", type=int, default=0, help="denoising steps (default: the algorithm's)")
    parser.add_argument("--report", type=Path, default=ROOT / "docs" / "round_breakdown.md")
    parser.add_argument("--data", type=Path, default=ROOT / "docs" / "round_breakdown" / "data.json")
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "runs", help="where the benchmark's run folders go")
    args = parser.parse_args(argv)
    settings: dict[str, Any] = {"eval_images": 1, "report_to": ["none"]}
    if args.quick:
        settings.update(samples_per_round=16, num_steps=10)
        args.rounds = 1
    if args.model:
        settings["model"] = args.model
    if args.samples:
        settings["samples_per_round"] = args.samples  # sampling batches: the automatic divisor of the round
    if args.steps:
        settings["num_steps"] = args.steps
    names = args.algorithm or ALGORITHMS.names()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    full = build_config(None, settings)
    header(f"round breakdown of {', '.join(names)}: {full.samples_per_round} samples x {full.num_steps} steps")
    data: dict[str, Any] = {"cpu": cpu_info(), "torch": torch.__version__, "rounds": args.rounds,
                            "settings": {"samples_per_round": full.samples_per_round, "num_steps": full.num_steps,
                                         "model": full.model},
                            "algorithms": {}}
    for name in names:
        r = data["algorithms"][name] = measure(name, settings, args.rounds, args.runs_dir)
        sec, ratio = r["seconds"], r["ratio_to_bare"]
        print(f"{name:20s} round {sec['round']:6.2f} s | sampling {sec['sampling']:5.2f} ({_ratio(ratio['sampling'])}; "
              f"{_ratio(r['ratio_to_networks']['sampling'])} of all networks) | "
              f"KL {sec['kl']:4.2f} ({_ratio(ratio['kl'])}) | reward {sec['reward']:4.2f} | update "
              f"{sec['update']:5.2f} ({_ratio(ratio['update'])}) | other {sec['other']:4.2f}")
    data["peak_memory_mb"] = peak_memory_mb()
    print(f"CPU: {describe_cpu(data['cpu'])}; peak memory {data['peak_memory_mb']:.0f} MB")
    if not args.no_write:
        command = " ".join(["python benchmarks/round_breakdown.py", *(argv if argv is not None else sys.argv[1:])])
        args.data.parent.mkdir(parents=True, exist_ok=True)
        args.data.write_text(json.dumps(data, indent=2) + "\n")
        args.report.write_text(report(data, command))
        print(f"wrote {args.report} and {args.data}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
