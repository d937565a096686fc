"""How aligned can the embedded model get on a prompt at all? A ceiling for what fine-tuning reaches.

    python benchmarks/ceiling.py                    # the default prompts and seeds, then docs/ceiling.md
    python benchmarks/ceiling.py --report-only      # rewrite the report from the kept results

RL fine-tuning of the embedded model stops near a judge-aligned share of 0.8 on its hard prompts
whichever method runs it (docs/tuning.md, docs/results_1k.md), and, in the tuning exploration, also
with the geometric judge itself as the reward (`--reward shapeworld-judge`). This asks what the model
can reach with the most direct signal there is: all of its denoiser's weights fine-tuned with the
plain denoising loss on renders of the prompt made by the world itself (ground truth, which no RL
method sees), 10 % of them with the empty prompt as in pretraining so guidance keeps working. Every
``--eval-every`` steps the model samples ``--eval-images`` fixed-noise images with the training
sampler (DDIM, 20 steps, eta 1, guidance 5) and the geometric judge scores them.

One result file per prompt and seed in docs/ceiling/data/ (a run continues from those), the report
in docs/ceiling.md with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("two white triangles", "four red squares", "an orange triangle")
STEPS, ETA, GUIDANCE = 20, 1.0, 5.0  # the training sampler's defaults
CFG_DROPOUT = 0.1  # the share of training rows with the empty prompt, as in pretraining


def slug(prompt: str) -> str:
    return "-".join(prompt.split())


def supervised_ceiling(prompt: str, seed: int, steps: int, lr: float, batch: int, renders: int, eval_every: int,
                       eval_images: int, model: str = "shapeworld", log: Any = print) -> dict[str, Any]:  # noqa: ANN401
    """Fine-tune every weight of ``model``'s denoiser on ``renders`` renders of ``prompt`` for ``steps``
    AdamW steps of ``batch`` and judge it at step 0 and every ``eval_every`` steps (and the last).

    Returns {"curve": [{"step", "judge_aligned", "clean_share", "reward_mean", "loss"}], "seconds"}; the
    evaluation noise is the same at every point (seed 900000 + seed), the training draws from ``seed``."""
    sys.path.insert(0, str(ROOT))
    import torch

    from dpok.adapter import DiffusionAdapter, PromptEmbeds
    from dpok.algorithms.supervised import denoising_target, forward_noised
    from dpok.domains import domain_for
    from dpok.evaluate import SampleSettings, evaluate_prompt, sample_prompt
    from dpok.rewards import make_reward
    from dpok.shapeworld import render_prompt

    torch.manual_seed(seed)
    adapter = DiffusionAdapter.load(model, "", "cpu")
    domain, reward = domain_for(model, "shapeworld-alignment"), make_reward("shapeworld-alignment")
    rng = np.random.default_rng([seed, 17])
    images = torch.from_numpy(np.stack([render_prompt(prompt, rng)[0] for _ in range(renders)]))
    x0_all = adapter.encode_images(images.permute(0, 3, 1, 2).float() / 255)
    with torch.no_grad():
        cond, empty = adapter.encode_prompts([prompt]), adapter.encode_prompts([""])
    denoiser = adapter.unet
    denoiser.requires_grad_(True)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    settings = SampleSettings(eval_images, STEPS, GUIDANCE, ETA)

    def judge(step: int, loss: float) -> dict[str, float]:
        denoiser.eval()
        with torch.no_grad():
            drawn = sample_prompt(adapter, prompt, settings, 900_000 + seed).images
        denoiser.train()
        row, _ = evaluate_prompt(adapter, reward, prompt, settings, 900_000 + seed, domain, images=drawn)
        point = {"step": step, "judge_aligned": row["judge_aligned"], "clean_share": row["clean_share"],
                 "reward_mean": row["reward_mean"], "loss": loss}
        log(f"  {prompt} seed {seed} step {step}: judge {point['judge_aligned']:.3f} clean {point['clean_share']:.3f}"
            + (f" loss {loss:.4f}" if step else ""))
        return point

    start = time.perf_counter()
    curve = [judge(0, float("nan"))]
    losses: list[float] = []
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(x0_all), (batch,), generator=gen)
        x0 = x0_all[idx].float()
        noise = torch.randn(x0.shape, generator=gen)
        t, latents = forward_noised(adapter, x0, noise, gen)
        drop = (torch.rand(batch, generator=gen) < CFG_DROPOUT).view(-1, 1, 1)
        states = torch.where(drop, empty.cond.expand(batch, -1, -1), cond.cond.expand(batch, -1, -1))
        pooled = None
        if cond.pooled is not None:
            pooled = torch.where(drop[:, :, 0], empty.pooled.expand(batch, -1), cond.pooled.expand(batch, -1))
        embeds = PromptEmbeds(states, empty.cond.expand(batch, -1, -1), pooled=pooled,
                              uncond_pooled=None if empty.pooled is None else empty.pooled.expand(batch, -1))
        pred = adapter.noise_pred(latents, t, embeds, 1.0).float()
        abar = None if adapter.is_flow else adapter.alphas_cumprod[t]
        loss = torch.nn.functional.mse_loss(pred, denoising_target(adapter.prediction_type, x0, noise, abar))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            curve.append(judge(step, float(np.mean(losses[-eval_every:]))))
    return {"curve": curve, "seconds": time.perf_counter() - start}


def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")


def write_report(results: list[dict[str, Any]], docs: Path) -> Path:
    """docs/ceiling.md and its plot from the kept results (one per prompt and seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise FileNotFoundError(f"no results in {docs / 'ceiling' / 'data'}; run benchmarks/ceiling.py first")
    s = results[0]["settings"]  # the evaluation's (every result's, by construction of the runs)
    cpus = sorted({f"{r['cpu']['model']}, {'with' if r['cpu']['avx512'] else 'without'} AVX-512" for r in results})
    lines = [
        "# How aligned can the embedded model get? The supervised ceiling", "",
        f"Generated by `benchmarks/ceiling.py` from its kept results (`docs/ceiling/data/`) on {'; '.join(cpus)}.", "",
        f"Every weight of the denoiser is fine-tuned with the plain denoising loss on {s['renders']} renders of the "
        f"prompt made by the world itself (ground truth, which no RL method sees), {int(CFG_DROPOUT * 100)} % of the "
        f"rows with the empty prompt; AdamW at a constant learning rate, batches of {s['batch']}. "
        f"At step 0 (the base model) and every {s['eval_every']} steps the model samples {s['eval_images']} "
        f"fixed-noise images with the training sampler (DDIM, {STEPS} steps, eta {ETA}, guidance {GUIDANCE}) and the "
        f"geometric judge scores them (standard error up to {0.5 / np.sqrt(s['eval_images']):.3f}). 'best' is the "
        "highest point of the curve, chosen after the fact, so it is an optimistic ceiling; 'last' is where the "
        "training ends.", "",
        "| prompt | steps | learning rate | seeds | base judge | best judge (step) | last judge | clean shapes, last "
        "| seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    by_prompt: dict[tuple[str, int, float], list[dict[str, Any]]] = {}
    for r in sorted(results, key=lambda r: (PROMPTS.index(r["prompt"]) if r["prompt"] in PROMPTS else len(PROMPTS),
                                            r["prompt"], r["settings"]["steps"], r["settings"]["lr"], r["seed"])):
        by_prompt.setdefault((r["prompt"], r["settings"]["steps"], r["settings"]["lr"]), []).append(r)
    for (prompt, steps, lr), runs in by_prompt.items():
        best = [max(r["curve"], key=lambda p: p["judge_aligned"]) for r in runs]
        lines.append(f"| {prompt} | {steps} | {lr:g} | {len(runs)} | "
                     f"{_mean_sd([r['curve'][0]['judge_aligned'] for r in runs])} | "
                     f"{_mean_sd([b['judge_aligned'] for b in best])} ({', '.join(str(b['step']) for b in best)}) | "
                     f"{_mean_sd([r['curve'][-1]['judge_aligned'] for r in runs])} | "
                     f"{_mean_sd([r['curve'][-1]['clean_share'] for r in runs])} | "
                     f"{np.mean([r['seconds'] for r in runs]):.0f} |")
    lines += ["", "Judge at each evaluation (mean over seeds):", ""]
    for (prompt, steps, lr), runs in by_prompt.items():
        points = np.mean([[p["judge_aligned"] for p in r["curve"]] for r in runs], axis=0)
        lines.append(f"- {prompt}, {steps} steps at lr {lr:g}: " + ", ".join(
            f"{p['step']}: {v:.3f}" for p, v in zip(runs[0]["curve"], points)))
    lines += ["", "![judge against fine-tuning steps](ceiling/curve.png)", ""]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    colours = {prompt: f"C{i}" for i, prompt in enumerate(dict.fromkeys(k[0] for k in by_prompt))}
    for (prompt, _steps, lr), runs in by_prompt.items():
        for k, r in enumerate(runs):
            ax.plot([p["step"] for p in r["curve"]], [p["judge_aligned"] for p in r["curve"]], "o-", alpha=0.8,
                    color=colours[prompt], label=f"{prompt}, lr {lr:g}" if k == 0 else None)
    ax.set_xlabel("fine-tuning steps on renders of the prompt")
    ax.set_ylabel("judge aligned")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    (docs / "ceiling").mkdir(parents=True, exist_ok=True)
    fig.savefig(docs / "ceiling" / "curve.png", dpi=110)
    plt.close(fig)
    path = docs / "ceiling.md"
    path.write_text("\n".join(lines))
    return path


def load_results(data: Path) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted(data.glob("*.json"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--renders", type=int, default=512)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-images", type=int, default=128)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    docs = Path(args.docs)
    data = docs / "ceiling" / "data"
    if not args.report_only:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import torch
        from _common import cpu_info

        from dpok.shapeworld import parse_prompt

        for prompt in args.prompts:
            parse_prompt(prompt)  # a prompt outside the grammar stops here, before any training
        settings = {k: getattr(args, k) for k in ("steps", "lr", "batch", "renders", "eval_every", "eval_images")}
        data.mkdir(parents=True, exist_ok=True)
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:  # called in a process that goes on (a test), the thread setting is given back
            for prompt in args.prompts:
                for seed in args.seeds:
                    kept = {(r["prompt"], r["seed"], json.dumps(r["settings"], sort_keys=True))
                            for r in load_results(data)}
                    if (prompt, seed, json.dumps(settings, sort_keys=True)) in kept:
                        continue
                    path = data / f"{slug(prompt)}-seed{seed}-steps{args.steps}-lr{args.lr:g}.json"
                    result = supervised_ceiling(prompt, seed, **settings)
                    path.write_text(json.dumps({"prompt": prompt, "seed": seed, "settings": settings,
                                                "cpu": cpu_info(), **result}, indent=1) + "\n")
        finally:
            torch.set_num_threads(threads)
    print(f"wrote {write_report(load_results(data), docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
