"""dpok against TRL's ``DDPOTrainer`` side by side, at equal work, on the embedded pipeline.

TRL 0.23.1 is the last release with ``DDPOTrainer``; it goes into a separate cached virtual
environment (torch pinned to the same CPU build, diffusers / transformers / peft / accelerate at the
versions dpok runs with, and dpok itself so that both score with the same reward code). Then, in
one run and alternating which goes first, each repeat runs

* ``benchmarks/_trl_ddpo.py``: TRL's ``DDPOTrainer.train()``;
* ``dpok train --algorithm ddpo-is`` with the same work: rounds = epochs, samples per round,
  sampling and training batches, DDIM steps, guidance, eta, LoRA rank 4 on the attention
  projections (TRL's fixed LoRA), all timesteps, one inner epoch, per-prompt statistics.

``--variants`` then runs dpok with its own denoiser options (``--compile`` and others), in a block
of their own after every TRL and stock run, so that nothing a compiling run leaves behind lands on
the comparison with TRL.

It prints and writes (``docs/vs_trl.md``, raw runs in ``docs/vs_trl/<cpu>.json``, one file per kind of CPU) the samples per
second of the training phases (sampling, reward, update: TRL's ``train()``, dpok's per-round
``time/*`` metrics) and of the whole process, for each tool, and dpok's ratio to TRL.

    python benchmarks/vs_trl.py [--repeats 3] [--venv DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TRL_VERSION = "0.23.1"
SHARED_PACKAGES = ("diffusers", "transformers", "peft", "accelerate")
ATTENTION = "to_q,to_k,to_v,to_out.0"  # the layers TRL's DDPO pipeline puts its rank-4 LoRA on
# dpok's own speed options (docs/denoiser_speed.md), each run as one more tool beside the stock call;
# TRL calls the stock diffusers UNet and has no counterpart
VARIANTS = {"compile": ("--compile",), "channels-last": ("--channels-last",), "bf16": ("--autocast", "bf16")}


def compiles(tool: str) -> bool:
    """Whether the tool ("dpok+<variant>" or a variant's name) runs torch.compile."""
    return "--compile" in VARIANTS.get(tool.removeprefix("dpok+"), ())


def schedule(repeats: int, variants: list[str]) -> list[tuple[int, str]]:
    """(repeat, tool) in the order they run: TRL and stock dpok alternate which goes first, repeat
    after repeat; then the variants, repeat after repeat (their order reversed every other repeat).
    A variant's repeat 0 therefore runs before its later repeats."""
    pairs = [(r, t) for r in range(repeats) for t in (("trl", "dpok") if r % 2 == 0 else ("dpok", "trl"))]
    block = [(r, v) for r in range(repeats) for v in (variants if r % 2 == 0 else variants[::-1])]
    return pairs + block


def inductor_dir(tmp: Path, variant: str) -> Path | None:
    """The compilation cache of a compiling variant: its own folder, empty before its first repeat."""
    return tmp / f"inductor-{variant}" if compiles(variant) else None


def ensure_trl_env(venv: Path, log: Any = print) -> Path:
    """The TRL environment's Python, built on first use (a few minutes; then cached)."""
    python = venv / "bin" / "python"
    stamp = venv / "dpok-vs-trl.json"
    wanted = {"trl": TRL_VERSION, **{p: importlib.metadata.version(p) for p in SHARED_PACKAGES},
              "torch": importlib.metadata.version("torch").split("+")[0]}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted and python.is_file():
        return python
    log(f"building the TRL {TRL_VERSION} environment in {venv} (once) ...")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    # torch first and pinned, so nothing after it pulls another (e.g. CUDA) build
    subprocess.run([*pip, f"torch=={wanted['torch']}"], check=True)
    subprocess.run([*pip, f"trl=={TRL_VERSION}", "ftfy", *(f"{p}=={wanted[p]}" for p in SHARED_PACKAGES)], check=True)
    subprocess.run([*pip, "-e", str(ROOT)], check=True)
    stamp.write_text(json.dumps(wanted))
    return python


def work_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"epochs": args.rounds, "samples": args.samples, "batch": args.batch, "steps": args.steps,
            "guidance": args.guidance, "eta": 1.0, "learning_rate": args.learning_rate,
            "stat_buffer": args.samples, "stat_min_count": args.samples}


def run_trl(python: Path, model: Path, args: argparse.Namespace) -> dict[str, Any]:
    w = work_options(args)
    cmd = [str(python), str(ROOT / "benchmarks" / "_trl_ddpo.py"), "--model", str(model), "--prompt", args.prompt,
           *[x for k, v in w.items() for x in (f"--{k.replace('_', '-')}", str(v))]]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"tool": "trl", "train_s": result["train_s"], "process_s": wall, "samples": result["samples"]}


def run_dpok(args: argparse.Namespace, out_dir: Path, variant: str = "", cache: Path | None = None) -> dict[str, Any]:
    """dpok's run of the same work: stock, or with the speed option ``variant`` (one of VARIANTS).

    ``cache``: the inductor cache folder of a compiling run. The benchmark gives compiling runs a
    folder of their own, empty before the first repeat: that run pays the whole compilation (as a
    first run on a machine does) and later ones find the compiled graphs (as later runs do)."""
    cmd = [sys.executable, "-m", "dpok", "train", "--algorithm", "ddpo-is", "--prompt", args.prompt,
           "--output-dir", str(out_dir), "--rounds", str(args.rounds), "--samples-per-round", str(args.samples),
           "--sample-batch-size", str(args.batch), "--minibatch-size", str(args.batch),
           "--num-steps", str(args.steps), "--guidance-scale", str(args.guidance), "--eta", "1",
           "--lora-rank", "4", "--lora-alpha", "4", "--lora-targets", ATTENTION, "--inner-epochs", "1",
           "--timestep-fraction", "1", "--advantage", "tracker", "--stat-buffer", str(args.samples),
           "--stat-min-count", str(args.samples), "--learning-rate", str(args.learning_rate),
           "--eval-images", str(args.eval_images), "--device", "cpu", *VARIANTS.get(variant, ())]
    env = {**os.environ, **({"TORCHINDUCTOR_CACHE_DIR": str(cache)} if cache else {})}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = [r for r in rows if "time/sample_s" in r]
    train_s = sum(r["time/sample_s"] + r["time/reward_s"] + r["time/update_s"] for r in rounds)
    return {"tool": f"dpok+{variant}" if variant else "dpok", "train_s": train_s, "process_s": wall,
            "samples": args.rounds * args.samples,
            "rounds_logged": len(rounds)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median samples/s of each tool, training phases and whole process, and each dpok tool's ratio
    to TRL's ("ratio" for stock dpok, "ratio:<tool>" for a variant).

    A compiling variant's median is over its warm repeats (1 and later: the compiled graphs are
    cached) when it has any; its cold repeat 0 (an empty cache) is "cold:<tool>", alone."""
    out: dict[str, Any] = {}
    tools = list(dict.fromkeys(r["tool"] for r in runs))
    for tool in tools:
        mine = sorted((r for r in runs if r["tool"] == tool), key=lambda r: r["repeat"])
        warm = [r for r in mine if r["repeat"] > 0] if compiles(tool) else mine
        out[tool] = {key: statistics.median(r["samples"] / r[f"{key}_s"] for r in warm or mine)
                     for key in ("train", "process")}
        if compiles(tool) and mine[0]["repeat"] == 0:
            out[f"cold:{tool}"] = {key: mine[0]["samples"] / mine[0][f"{key}_s"] for key in ("train", "process")}
    for tool in tools:
        if tool.startswith("dpok"):
            name = "ratio" if tool == "dpok" else f"ratio:{tool}"
            out[name] = {key: out[tool][key] / out["trl"][key] for key in ("train", "process")}
    return out


def machine_section(data: dict[str, Any]) -> list[str]:
    """The report's section of one machine's run (``data``: what :func:`main` keeps of it)."""
    s, a = data["summary"], data["settings"]
    lines = [
        f"## {data['cpu']}",
        "",
        f"Written by `benchmarks/vs_trl.py` on {data['cpu']}, {data['threads']} threads, torch {data['torch']}, "
        f"TRL {TRL_VERSION}; {a['repeats']} repeats, alternating which tool goes first.",
        "",
        f"Equal work: {a['rounds']} rounds (epochs) x {a['samples']} samples of `{a['prompt']}`, sampling and "
        f"training batches of {a['batch']}, {a['steps']} DDIM steps, guidance {a['guidance']}, eta 1, LoRA rank 4 "
        f"on {ATTENTION}, all timesteps, one inner epoch, per-prompt statistics; dpok's before/after evaluation "
        f"draws {a['eval_images']} images per prompt (TRL has none).",
        "",
        "| | TRL samples/s | dpok samples/s | dpok / TRL |",
        "|---|---:|---:|---:|",
        f"| training phases (sample, reward, update) | {s['trl']['train']:.3f} | {s['dpok']['train']:.3f} "
        f"| {s['ratio']['train']:.2f}x |",
        f"| whole process | {s['trl']['process']:.3f} | {s['dpok']['process']:.3f} | {s['ratio']['process']:.2f}x |",
        "",
        f"Medians over the repeats; every run's seconds are in `docs/vs_trl/{raw_name(data['cpu'])}`.",
        "",
    ]
    variants = [t for t in s if t.startswith("dpok+")]
    if variants:
        lines += [
            "### dpok with a speed option",
            "",
            "The same work with one of dpok's denoiser options (docs/denoiser_speed.md), run after all the runs "
            "above, in a block of their own; TRL has no counterpart, and each ratio is to TRL's median above. "
            "A compiling option's samples/s are the median of its warm repeats (the second and later: the "
            "compiled graphs are in the cache, though each new process still traces the model), and its first "
            "repeat, from an empty compilation cache, is shown alone as the cold run, as a machine's first "
            "run pays it. The training phases leave out the before/after evaluation and the KL logging, where "
            "a compiling run also compiles; the whole process holds that cost.",
            "",
            "| dpok option | training phases samples/s | / TRL | whole process samples/s | / TRL "
            "| cold first run: training phases / TRL | cold first run: whole process / TRL |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for tool in variants:
            r, cold = s[f"ratio:{tool}"], s.get(f"cold:{tool}")
            cells = ([f"{cold[k] / s['trl'][k]:.2f}x" for k in ("train", "process")] if cold else ["—", "—"])
            lines.append(f"| `{' '.join(VARIANTS[tool[5:]])}` | {s[tool]['train']:.3f} | {r['train']:.2f}x "
                         f"| {s[tool]['process']:.3f} | {r['process']:.2f}x | {cells[0]} | {cells[1]} |")
        lines.append("")
    return lines


def raw_name(cpu: str) -> str:
    """The raw results file of one machine (``cpu`` as :func:`dpok.utils.machine.cpu_description` names it)."""
    return re.sub(r"[^a-z0-9]+", "-", cpu.lower()).strip("-") + ".json"


def write_report(datas: list[dict[str, Any]], path: Path) -> None:
    """The report: one section per machine whose raw results are kept, in the order given."""
    lines = ["# dpok against TRL's DDPOTrainer", "",
             "Each machine's latest run of `benchmarks/vs_trl.py`, kept one file per kind of CPU: the ratios hold "
             "within a run; seconds differ between machines.", ""]
    for data in datas:
        lines += machine_section(data)
    path.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--venv", type=Path, default=Path.home() / ".cache" / "dpok" / f"trl-{TRL_VERSION}",
                   help="where the TRL environment is built and cached")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--eval-images", type=int, default=4, help="dpok's before/after evaluation images per prompt")
    p.add_argument("--prompt", default="two white triangles")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of both tools' processes (0: torch's default, one per core)")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "vs_trl.md")
    p.add_argument("--variants", nargs="*", default=["compile"], choices=sorted(VARIANTS),
                   help="dpok speed options run as more tools beside stock dpok (none: stock only)")
    args = p.parse_args()
    args.variants = list(dict.fromkeys(args.variants))  # a repeated name would reuse a run folder
    if args.samples % args.batch:
        p.error("--samples must be a multiple of --batch (TRL draws whole sampling batches)")

    import torch

    from dpok.assets import default_model_dir
    from dpok.utils.machine import cpu_description

    python = ensure_trl_env(args.venv)
    if args.threads:  # both children read it when torch starts: the same thread count for both tools
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat, tool in schedule(args.repeats, args.variants):
            if tool == "trl":
                run = run_trl(python, default_model_dir(), args)
            else:
                variant = "" if tool == "dpok" else tool
                run = run_dpok(args, Path(tmp) / f"dpok{repeat}{variant}", variant, inductor_dir(Path(tmp), variant))
            run["repeat"] = repeat
            runs.append(run)
            print(f"repeat {repeat} {run['tool']:>12}: training phases {run['train_s']:.1f} s, "
                  f"whole process {run['process_s']:.1f} s", flush=True)
    data = {"cpu": cpu_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "settings": {**vars(args), "venv": None, "report": None}, "runs": runs, "summary": summarise(runs)}
    raw = args.report.parent / args.report.stem / raw_name(data["cpu"])
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(data, indent=1) + "\n")
    write_report([json.loads(f.read_text()) for f in sorted(raw.parent.glob("*.json"))], args.report)
    s = data["summary"]
    print(f"dpok / TRL samples/s: training phases {s['ratio']['train']:.2f}x, whole process {s['ratio']['process']:.2f}x"
          f"  ({data['cpu']})")
    for tool in args.variants:
        r = s[f"ratio:dpok+{tool}"]
        print(f"dpok {' '.join(VARIANTS[tool])} / TRL: training phases {r['train']:.2f}x, whole process "
              f"{r['process']:.2f}x")
    print(f"wrote {args.report}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
