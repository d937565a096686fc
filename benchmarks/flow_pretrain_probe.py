"""Which transformer and learning rate should the embedded flow model be pretrained with? Short probes.

    python benchmarks/flow_pretrain_probe.py --work-dir WORK --name lr2e-3 --lr 2e-3   # one probe
    python benchmarks/flow_pretrain_probe.py --report-only                             # rewrite the report

Pretraining the flow model takes most of its 120-minute budget, so candidates are compared on short
runs of equal wall time instead: each trains a fresh ``SD3Transformer2DModel`` of the given width,
depth and patch size with the pretraining loss (rectified flow, logit-normal t, 10 % empty captions,
batch 64, AdamW, warm-up then cosine decay over the probe's time) on the latent pool of a pretraining
work folder (``dpok pretrain --family flow-matching --work-dir WORK --stages transformer`` makes it),
its last 1024 latents held out. Every 250 steps it measures the held-out velocity loss at
t = 0.1, 0.3, 0.5, 0.7, 0.9 (the same noise each time); at the end the geometric judge scores 4 images
of each common prompt (20 Euler steps, guidance 5), which at this stage says little more than the
loss. Equal time, not equal steps: a wider or finer model takes fewer steps in the same minutes.

One result file per probe in docs/flow_pretrain_probe/data/, the report in docs/flow_pretrain_probe.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
HELD_OUT = 1024
VAL_T = (0.1, 0.3, 0.5, 0.7, 0.9)
BATCH, WARMUP, CFG_DROPOUT, EVAL_EVERY = 64, 300, 0.1, 250


def probe(work_dir: str, width: int, layers: int, patch: int, lr: float, minutes: float, judge_images: int = 4,
          judge_prompts: int = 0, log: Any = print) -> dict[str, Any]:  # noqa: ANN401
    """Train one candidate for ``minutes`` of wall time; its loss curve and final judge score.

    Returns {"curve": [{"step", "seconds", "val", "val_t0.1", ...}], "steps", "judge_common", "params"}."""
    sys.path.insert(0, str(ROOT))
    import torch
    from diffusers import SD3Transformer2DModel
    from torch.nn import functional as F

    from dpok.attention import fold_text_tokens
    from dpok.embedded.architecture import SD3_T5_TOKENS
    from dpok.embedded.pretrain_config import PretrainConfig
    from dpok.embedded.pretrain_flow import encode_ids, judge_pipeline, load_components, make_pipeline
    from dpok.embedded.stages import Context, _tokenize, is_complete, load_state
    from dpok.shapeworld import prompt_sets
    from dpok.shapeworld.judge import is_aligned

    ctx = Context(PretrainConfig(family="flow-matching", work_dir=work_dir))
    pool_path = ctx.stage_dir("transformer") / "latent_pool"
    if not is_complete(pool_path):
        raise FileNotFoundError(f"{work_dir} has no latent pool; make one with 'dpok pretrain --family flow-matching "
                                f"--work-dir {work_dir} --stages transformer --max-steps-per-run 1'")
    parts = load_components(ctx)
    pool = load_state(pool_path)
    n_pool = len(pool["mean"])
    held_out = min(HELD_OUT, n_pool // 4)
    torch.manual_seed(0)
    rng = np.random.default_rng(1)
    model = SD3Transformer2DModel(sample_size=16, patch_size=patch, in_channels=4, out_channels=4, num_layers=layers,
                                  attention_head_dim=width // 4, num_attention_heads=4, joint_attention_dim=128,
                                  caption_projection_dim=width, pooled_projection_dim=128,
                                  pos_embed_max_size=16 // patch)
    fold_text_tokens(model, SD3_T5_TOKENS, parts["tokenizer"].model_max_length + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    empty = _tokenize(parts["tokenizer"], [""])
    scale = parts["vae"].config.scaling_factor

    def draw(idx: torch.Tensor, r: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.from_numpy(r.standard_normal(pool["mean"][idx].shape)).float()
        x0 = (pool["mean"][idx] + pool["std"][idx] * z) * scale
        return x0, torch.from_numpy(r.standard_normal(x0.shape)).float()

    vidx = torch.arange(n_pool - held_out, n_pool)
    vx0, vnoise = draw(vidx, np.random.default_rng(7))
    with torch.no_grad():
        vstates, vpooled = encode_ids(parts, pool["input_ids"][vidx])
    vt = torch.tensor(np.resize(VAL_T, held_out)).float()

    def validate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            errors = []
            for s in range(0, held_out, 256):
                sl, tb = slice(s, s + 256), vt[s:s + 256, None, None, None]
                pred = model(hidden_states=(1 - tb) * vx0[sl] + tb * vnoise[sl], encoder_hidden_states=vstates[sl],
                             pooled_projections=vpooled[sl], timestep=vt[sl] * 1000).sample
                errors.append(((pred - (vnoise[sl] - vx0[sl])) ** 2).mean((1, 2, 3)))
            err = torch.cat(errors)
        model.train()
        return {"val": round(err.mean().item(), 4), **{f"val_t{t}": round(err[vt == t].mean().item(), 4) for t in VAL_T}}

    curve, step, budget, start = [], 0, minutes * 60, time.perf_counter()
    while time.perf_counter() - start < budget:
        # warm-up, then cosine decay over the probe's wall time (to 5 %), as pretraining decays over its steps
        frac = (time.perf_counter() - start) / budget
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / WARMUP) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        idx = torch.from_numpy(rng.integers(0, n_pool - held_out, BATCH))
        x0, noise = draw(idx, rng)
        t = torch.sigmoid(torch.from_numpy(rng.normal(0, 1, BATCH)).float())
        ids = pool["input_ids"][idx].clone()
        ids[torch.from_numpy(rng.random(BATCH) < CFG_DROPOUT)] = empty
        with torch.no_grad():
            states, pooled = encode_ids(parts, ids)
        tb = t[:, None, None, None]
        pred = model(hidden_states=(1 - tb) * x0 + tb * noise, encoder_hidden_states=states,
                     pooled_projections=pooled, timestep=t * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % EVAL_EVERY == 0:
            curve.append({"step": step, "seconds": round(time.perf_counter() - start, 1), **validate()})
            log(f"  step {step} ({curve[-1]['seconds']:.0f} s): held-out loss {curve[-1]['val']:.4f}")
    if not curve or curve[-1]["step"] != step:
        curve.append({"step": step, "seconds": round(time.perf_counter() - start, 1), **validate()})
    model.eval()
    pipe = make_pipeline(parts, model)
    prompts = prompt_sets()["common"][: judge_prompts or None]
    judged = []
    for i, prompt in enumerate(prompts):
        images = judge_pipeline(pipe, [prompt], judge_images, 20, 5.0, i)
        judged.append(float(np.mean([is_aligned(im, prompt) for im in images])))
    return {"curve": curve, "steps": step, "judge_common": float(np.mean(judged)),
            "params": sum(p.numel() for p in model.parameters())}


def write_report(results: list[dict[str, Any]], docs: Path) -> Path:
    if not results:
        raise FileNotFoundError(f"no results in {docs / 'flow_pretrain_probe' / 'data'}; run a probe first")
    cpus = sorted({f"{r['cpu']['model']}, {'with' if r['cpu']['avx512'] else 'without'} AVX-512" for r in results})
    lines = [
        "# Flow model pretraining: short probes of width, depth, patch and learning rate", "",
        f"Generated by `benchmarks/flow_pretrain_probe.py` from its kept results (`docs/flow_pretrain_probe/data/`) "
        f"on {'; '.join(cpus)}. Each probe trains a fresh transformer for the same wall time on the pretraining "
        f"latent pool (batch {BATCH}, the pretraining loss), the last {HELD_OUT} latents held out; lower held-out "
        "velocity loss is better. Judge: 4 images of each common prompt at the end (20 Euler steps, guidance 5), "
        "little signal this early. Threads: those the probe ran with, two probes sharing the machine at a time.", "",
        "| probe | width | layers | patch | parameters | learning rate | minutes | threads | steps | held-out loss "
        "| at t = " + ", ".join(f"{t}" for t in VAL_T) + " | judge, common |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(results, key=lambda r: r["curve"][-1]["val"]):
        s, last = r["settings"], r["curve"][-1]
        stopped = " (stopped early)" if r.get("stopped_early") else ""
        lines.append(f"| {r['name']}{stopped} | {s['width']} | {s['layers']} | {s['patch']} | {r['params'] / 1e6:.2f} M "
                     f"| {s['lr']:g} | {s['minutes']:g} | {s['threads']} | {r['steps']} | **{last['val']:.4f}** | "
                     + ", ".join(f"{last[f'val_t{t}']:.3f}" for t in VAL_T)
                     + f" | {'—' if r.get('judge_common') is None else format(r['judge_common'], '.3f')} |")
    lines += ["", "Held-out loss against wall time:", ""]
    for r in results:
        lines.append(f"- {r['name']}: " + ", ".join(f"{p['seconds']:.0f} s: {p['val']:.3f}" for p in r["curve"]))
    path = docs / "flow_pretrain_probe.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default="pretrain_work_flow", help="pretraining work folder with the latent pool")
    p.add_argument("--name", help="the probe's name (its result file)")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--patch", type=int, default=2, choices=(1, 2, 4))
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--minutes", type=float, default=12.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--judge-prompts", type=int, default=0, help="common prompts judged at the end (0: all)")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    docs = Path(args.docs)
    data = docs / "flow_pretrain_probe" / "data"
    if not args.report_only:
        if not args.name:
            p.error("give the probe a --name")
        if args.width % 4 or args.width < 8:
            p.error(f"--width must be a multiple of 4 (4 attention heads), got {args.width}")
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import torch
        from _common import cpu_info

        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            settings = {k: getattr(args, k) for k in ("width", "layers", "patch", "lr", "minutes", "threads")}
            result = probe(args.work_dir, args.width, args.layers, args.patch, args.lr, args.minutes,
                           judge_prompts=args.judge_prompts)
        finally:
            torch.set_num_threads(threads)
        data.mkdir(parents=True, exist_ok=True)
        (data / f"{args.name}.json").write_text(json.dumps({"name": args.name, "settings": settings, "cpu": cpu_info(),
                                                            **result}, indent=1) + "\n")
    results = [json.loads(f.read_text()) for f in sorted(data.glob("*.json"))]
    print(f"wrote {write_report(results, docs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
