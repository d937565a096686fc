"""The denoiser's speed options against the stock call, on the embedded models.

    python benchmarks/denoiser_speed.py                    # both embedded models, every option
    python benchmarks/denoiser_speed.py --options stock bf16 --models shapeworld
    python benchmarks/denoiser_speed.py --report-only      # rewrite the report from the kept results

For each model and option (``stock``; ``channels-last``; ``bf16``: bf16 autocast with fp32 weights;
``channels-last+bf16``; ``compile``: torch.compile with inductor) a fresh adapter with the default
LoRA is timed, interleaved with the others over ``--repeats`` passes, on the two calls a round is
made of:

- sampling: one guided denoiser call without gradients at ``--batch`` samples (2 x batch rows with CFG);
- update: the same call with gradients into the LoRA weights, forward and backward.

Each option is also checked for what training relies on: the output's error relative to the stock
call at the same weights, and the largest |ratio - 1| before any update, between a 2-sample, 10-step
trajectory's log-probs at sampling time and the same steps evaluated in one batch as the update
does. ``first call`` is the first sampling call's time (torch.compile compiles there).

The results of each machine are kept in ``docs/denoiser_speed/<cpu>.json`` (one file per kind of
CPU, so the AVX2-only and AVX-512 machines are reported side by side) and docs/denoiser_speed.md is
written from every kept file.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

OPTIONS = {"stock": {}, "channels-last": {"channels_last": True}, "bf16": {"autocast": "bf16"},
           "channels-last+bf16": {"channels_last": True, "autocast": "bf16"}, "compile": {"compile_denoiser": True}}
MODELS = ("shapeworld", "shapeworld-flow")
PROMPT = "two white triangles"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--batch", type=int, default=16, help="samples per call (x2 rows with guidance)")
    p.add_argument("--repeats", type=int, default=10, help="timed passes over the options")
    p.add_argument("--calls", type=int, default=3, help="calls in a row per timing (their mean is one sample)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=str(ROOT / "docs" / "denoiser_speed"))
    p.add_argument("--report", default=str(ROOT / "docs" / "denoiser_speed.md"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    # stock first: the others' errors are measured against it
    args.options = ["stock", *[o for o in dict.fromkeys(args.options) if o != "stock"]]
    return args


def build(model: str, speed: dict[str, Any]):  # noqa: ANN201 - a DiffusionAdapter
    import torch

    from dpok.adapter import DiffusionAdapter
    from dpok.config import build_config

    cfg = build_config(None, {"model": model})  # the model's default LoRA targets (the flow defaults on the flow model)
    adapter = DiffusionAdapter.from_pretrained(model)
    torch.manual_seed(0)
    adapter.add_lora(cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets.split(",")))
    with torch.no_grad():  # LoRA B starts at 0; give it a trained-like size so its cost and error show
        for name, p in adapter.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(len(name)))
    adapter.set_speed(**speed)
    return adapter, cfg


def calls(adapter, cfg, batch: int):  # noqa: ANN001, ANN201
    import torch

    c, h, w = adapter.latent_shape
    x = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(1))
    t = torch.full((batch,), 500.0 if adapter.is_flow else 500)
    embeds = adapter.encode_prompts([PROMPT] * batch)

    def sample() -> torch.Tensor:
        with torch.no_grad():
            return adapter.noise_pred(x, t, embeds, cfg.guidance_scale)

    def update() -> None:
        adapter.noise_pred(x, t, embeds, cfg.guidance_scale).square().mean().backward()
        adapter.unet.zero_grad(set_to_none=True)

    return sample, update


def ratio_error(adapter, cfg) -> float:  # noqa: ANN001
    import torch

    from dpok.sampling import evaluate_log_probs, sample_in_batches

    steps = 10
    traj = sample_in_batches(adapter, [PROMPT, PROMPT], 2, steps, cfg.eta, cfg.guidance_scale,
                             torch.Generator().manual_seed(0), logprob_reduce=cfg.logprob_reduce)
    n = traj.batch_size
    embeds = traj.embeds[torch.arange(n).repeat_interleave(steps)]
    with torch.no_grad():
        log_probs, _, _ = evaluate_log_probs(adapter, traj.latents.flatten(0, 1), traj.next_latents.flatten(0, 1),
                                             traj.timesteps.repeat(n), embeds, cfg.guidance_scale, cfg.eta, steps,
                                             cfg.logprob_reduce)
    return float((torch.exp(log_probs - traj.log_probs.flatten()) - 1).abs().max())


def timed(fn, calls: int = 1) -> float:  # noqa: ANN001
    """Seconds per call of ``calls`` calls in a row."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def measure_model(model: str, options: list[str], args: argparse.Namespace) -> dict[str, Any]:
    built, first, reference = {}, {}, None
    for name in options:
        adapter, cfg = build(model, OPTIONS[name])
        sample, update = calls(adapter, cfg, args.batch)
        first[name] = timed(sample)
        update()  # the first backward compiles too
        out = sample()
        reference = out if name == "stock" else reference
        built[name] = (adapter, cfg, sample, update, out)
        print(f"{model} {name}: built, first call {first[name]:.2f} s", flush=True)
    times: dict[str, dict[str, list[float]]] = {n: {"sample": [], "update": []} for n in options}
    for r in range(args.repeats):  # interleaved, so a busier stretch of the machine falls on every option
        for name in options:
            _, _, sample, update, _ = built[name]
            times[name]["sample"].append(timed(sample, args.calls))
            times[name]["update"].append(timed(update, args.calls))
        print(f"{model}: pass {r + 1}/{args.repeats}", flush=True)
    rows = {}
    for name in options:
        adapter, cfg, _, _, out = built[name]
        err = (float((out - reference).norm() / reference.norm()) if reference is not None else None)
        rows[name] = {"sample_s": statistics.median(times[name]["sample"]),
                      "update_s": statistics.median(times[name]["update"]), "first_call_s": first[name],
                      "relative_error": err, "max_ratio_error": ratio_error(adapter, cfg),
                      "raw": times[name]}
    return rows


def cpu_key(info: dict[str, Any]) -> str:
    kind = "avx512" if info["avx512"] else "avx2"
    return re.sub(r"[^a-z0-9]+", "-", f"{info['model']}-{kind}".lower()).strip("-")


def run(args: argparse.Namespace) -> None:
    import torch
    from _common import cpu_info

    torch.set_num_threads(args.threads)
    info = cpu_info()
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / f"{cpu_key(info)}.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"cpu": info, "models": {}}
    saved.update(cpu=info, batch=args.batch, repeats=args.repeats, calls=args.calls, torch=torch.__version__,
                 date=time.strftime("%Y-%m-%d"))
    for model in args.models:
        # a rerun of some options keeps the model's other rows (stock is always remeasured with them)
        saved["models"][model] = {**saved["models"].get(model, {}), **measure_model(model, args.options, args)}
        path.write_text(json.dumps(saved, indent=1) + "\n")
    print(f"raw results -> {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def report(args: argparse.Namespace) -> str:
    from _common import describe_cpu

    files = sorted(Path(args.data_dir).glob("*.json"))
    lines = ["# Denoiser speed options against the stock call", "",
             "Generated by `benchmarks/denoiser_speed.py` from the raw results in `docs/denoiser_speed/` (one file "
             "per kind of CPU). Each option is a fresh adapter with the model's default LoRA (B weights drawn "
             "small, so the adapters cost and change what they would after training), timed interleaved with the "
             "other options; medians. `sampling`: one guided call without gradients; `update`: the same call, "
             "forward and backward into the LoRA weights. `× stock` above 1 is faster. `error`: the output's "
             "norm of difference relative to the stock output; `|ratio − 1|`: the largest over a 2-sample, "
             "10-step trajectory between its log-probs at sampling time and the same steps evaluated in one "
             "batch, as an update's first step does (1e-6 and below is float rounding). `first call s`: the first "
             "sampling call, where torch.compile compiles (inductor keeps a cache on disk, so a machine that has "
             "compiled the same model before pays less; each new shape of a run compiles again).", ""]
    for f in files:
        data = json.loads(f.read_text())
        lines += [f"## {describe_cpu(data['cpu'])}", "",
                  f"Batch {data['batch']} samples per call (x2 rows with guidance), {data['repeats']} passes of "
                  f"{data.get('calls', 1)} calls in a row per option, torch "
                  f"{data['torch']}, {data['date']}.", ""]
        for model, rows in data["models"].items():
            stock = rows.get("stock")
            lines += [f"### `{model}`", "", "| option | sampling s | × stock | update s | × stock | first call s | "
                      "error | \\|ratio − 1\\| |", "|---|---|---|---|---|---|---|---|"]
            for name, r in rows.items():
                fs = stock["sample_s"] / r["sample_s"] if stock else None
                fu = stock["update_s"] / r["update_s"] if stock else None
                lines.append(f"| {name} | {r['sample_s']:.4f} | {fmt(fs, '.2f')} | {r['update_s']:.4f} | "
                             f"{fmt(fu, '.2f')} | {r['first_call_s']:.2f} | {fmt(r['relative_error'], '.1e')} | "
                             f"{r['max_ratio_error']:.1e} |")
            lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if not args.report_only:
        run(args)
    text = report(args)
    Path(args.report).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
