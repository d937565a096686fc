"""Where along the trajectory a prompt's outcome is decided: branch sampled trajectories at each
denoising step, finish each branch point several times with fresh noise, and judge the results.

    python benchmarks/decision_steps.py                  # the base model and a default `dpok train` run
    python benchmarks/decision_steps.py --report-only    # rewrite the report from the kept data

For each model (the base, and the LoRA of `dpok train` with no options but the prompt, trained here
unless its folder already holds one) it samples ``--trajectories`` trajectories of the prompt with
the training sampler (DDIM, eta 1, guidance 5, 20 steps), and at each step s of ``--branch-steps``
continues every trajectory's state x_s ``--branches`` times with fresh noise to the end. The
geometric judge (it shares no weights with the reward) scores every continuation. Per step:

- the aligned share of the continuations, and the shares with an object missing or extra;
- the share of the outcome's variance fixed by the state x_s (the intra-class correlation of the
  k continuations of each state, :func:`state_share`): near 0 when what happens after step s
  still decides everything, 1 when x_s alone decides whether the image will be aligned. Past the
  step where it reaches its ceiling, later steps cannot change the outcome, and their policy
  gradient carries no signal about it: it is noise for a policy-gradient method.

Writes docs/decision_steps.md, its plot and data (docs/decision_steps/), with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "two white triangles"  # the default prompt of `dpok train` on the embedded model
STEPS, ETA, GUIDANCE = 20, 1.0, 5.0  # the training sampler's defaults
BRANCH_STEPS = (0, 1, 2, 3, 4, 6, 8, 10, 12, 14, 16)


def state_share(outcomes: np.ndarray) -> float:
    """The share of a binary outcome's variance fixed by the state it was continued from.

    ``outcomes`` (G, k): k continuations (1 aligned, 0 not) of each of G states. One-way ANOVA
    estimate of the intra-class correlation: with p_g the states' success rates, the within-state
    variance w = mean_g p_g (1 - p_g) k / (k - 1) and the between-state variance
    b = var_g(p_g) - w / k (unbiased); share = b / (b + w), clipped to [0, 1] (a negative estimate
    is sampling noise around 0). NaN when every outcome is the same (no variance to share).
    """
    outcomes = np.asarray(outcomes, dtype=float)
    groups, k = outcomes.shape
    if groups < 2 or k < 2:
        raise ValueError(f"need at least 2 states and 2 continuations each, got {outcomes.shape}")
    p = outcomes.mean(axis=1)
    within = float(np.mean(p * (1 - p)) * k / (k - 1))
    between = float(p.var(ddof=1) - within / k)
    if within + between <= 0 or np.all(outcomes == outcomes.flat[0]):
        return float("nan")
    return float(np.clip(between / (between + within), 0.0, 1.0))


def state_share_se(outcomes: np.ndarray, resamples: int = 500, seed: int = 0) -> float:
    """Bootstrap standard error of :func:`state_share` over the states (rows drawn with replacement);
    NaN when fewer than two resamples have variance."""
    outcomes = np.asarray(outcomes, dtype=float)
    rng = np.random.default_rng(seed)
    shares = [state_share(outcomes[rng.integers(0, len(outcomes), len(outcomes))]) for _ in range(resamples)]
    shares = [s for s in shares if s == s]
    return float(np.std(shares, ddof=1)) if len(shares) > 1 else float("nan")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def trained_with(model: dict) -> str:
    """The KL weight the LoRA's run used: the defaults change, the kept data stays."""
    if not model.get("lora"):
        return ""
    # data kept before runs recorded it was trained when the default KL weight was 0.01
    return f" Its run's KL weight: beta {model.get('beta', 0.01):g}."


def run_beta(run: Path) -> float:
    """The KL weight a run folder's recorded settings hold."""
    return float(json.loads((run / "config.json").read_text())["beta"])


def train_default(prompt: str, folder: Path) -> float:
    """`dpok train --prompt P` with no other option (but the run folder); seconds it took (0 if it
    was there already)."""
    if (folder / "lora").is_dir():
        return 0.0
    start = time.time()
    subprocess.run([sys.executable, "-m", "dpok", "train", "--prompt", prompt, "--output-dir", str(folder),
                    "--report-to", "none"], check=True, env=_env(), cwd=ROOT)
    return time.time() - start


def analyse(model: str, lora: str, prompt: str, trajectories: int, branches: int, branch_steps: tuple[int, ...],
            seed: int, chunk: int = 64) -> list[dict[str, float]]:
    """One row per branch step (see the module docstring)."""
    sys.path.insert(0, str(ROOT))
    import torch

    from dpok.adapter import DiffusionAdapter
    from dpok.sampling import sample_trajectories
    from dpok.shapeworld.judge import flaws

    adapter = DiffusionAdapter.load(model, lora, "cpu")
    rows = []
    with torch.no_grad():
        traj = sample_trajectories(adapter, [prompt] * trajectories, STEPS, ETA, GUIDANCE,
                                   torch.Generator().manual_seed(seed), with_log_probs=False)
        for s in branch_steps:
            gen = torch.Generator().manual_seed(seed + 1 + s)
            states = traj.latents[:, s].repeat_interleave(branches, 0)  # (G k, C, h, w), k per state
            found = []
            for start in range(0, len(states), chunk):
                part = states[start:start + chunk]
                out = sample_trajectories(adapter, [prompt] * len(part), STEPS, ETA, GUIDANCE, gen,
                                          with_log_probs=False, initial=part, start_step=s)
                found += [flaws(image, prompt) for image in out.images.permute(0, 2, 3, 1).cpu().numpy()]
            aligned = np.array([not f for f in found], dtype=float).reshape(trajectories, branches)
            rows.append({"step": s, "timestep": int(traj.timesteps[s]), "aligned": float(aligned.mean()),
                         "state_share": state_share(aligned), "state_share_se": state_share_se(aligned),
                         "outcomes": aligned.astype(int).tolist(),
                         "missing": float(np.mean(["missing" in f for f in found])),
                         "extra": float(np.mean(["extra" in f for f in found]))})
            print(f"  {lora or 'base'}: branch at step {s:2d}: aligned {rows[-1]['aligned']:.3f}, fixed by the "
                  f"state {rows[-1]['state_share']:.2f}", flush=True)
    return rows


def _fmt(v: float) -> str:
    return "–" if v != v else f"{v:.2f}"


def write_report(data: dict, out: Path, docs: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpu = data["cpu"]
    s = data["settings"]
    lines = [
        "# Where a prompt's outcome is decided along the trajectory", "",
        f"Generated by `benchmarks/decision_steps.py` (raw results: `docs/decision_steps/data.json`) on {cpu['model']}, "
        f"{'with' if cpu['avx512'] else 'without'} AVX-512. Prompt `{s['prompt']}`; the training sampler (DDIM, "
        f"{s['steps']} steps, eta {s['eta']}, guidance {s['guidance']}). Each model samples {s['trajectories']} "
        f"trajectories; at each step s below, each trajectory's state x_s is finished {s['branches']} times with "
        "fresh noise and the geometric judge (it shares no weights with the reward) scores every image.", "",
        "*Fixed by the state*: the share of the outcome's variance (aligned or not) that the state x_s already "
        "fixes (the intra-class correlation of each state's continuations; 0: the later steps still decide "
        "everything, 1: x_s decides alone). It stops rising at the step after which the remaining steps cannot "
        "change the outcome; below 1 at the end only because the judge's verdicts and the last steps' pixels "
        "are not perfectly repeatable. ± is its bootstrap standard error over the states; the fewer the "
        "misaligned images, the larger it is.",
        "",
    ]
    for name, model in data["models"].items():
        lines += [f"## {name}", "", model["what"] + trained_with(model), "",
                  "| step s | timestep | aligned | fixed by the state | object missing | object extra |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['step']} | {r['timestep']} | {r['aligned']:.3f} | {_fmt(r['state_share'])} ± "
                  f"{_fmt(r['state_share_se'])} | "
                  f"{r['missing']:.3f} | {r['extra']:.3f} |" for r in model["rows"]]
        lines.append("")
    lines += ["![share of the outcome fixed by the state, per step](decision_steps/share.png)", ""]
    (docs / "decision_steps.md").write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for name, model in data["models"].items():
        ax.plot([r["step"] for r in model["rows"]], [r["state_share"] for r in model["rows"]], "o-", label=name)
    ax.set_xlabel(f"branch step s (of {s['steps']}; 0 = the noisiest)")
    ax.set_ylabel("outcome variance fixed by x_s")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(s["prompt"])
    fig.tight_layout()
    fig.savefig(out / "share.png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--trajectories", type=int, default=32, help="states (trajectories) per model")
    p.add_argument("--branches", type=int, default=8, help="continuations of each state")
    p.add_argument("--branch-steps", default=",".join(map(str, BRANCH_STEPS)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(ROOT / "runs" / "decision-steps"), help="folder of the training run")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    docs = Path(args.docs)
    out = docs / "decision_steps"
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        write_report(json.loads((out / "data.json").read_text()), out, docs)
        return
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from _common import cpu_info

    steps = tuple(int(x) for x in args.branch_steps.split(","))
    if not all(0 <= s < STEPS for s in steps):
        p.error(f"--branch-steps must lie in [0, {STEPS})")
    run = Path(args.work) / "-".join(args.prompt.split())
    train_s = train_default(args.prompt, run)
    models = {
        "base model": ("", "The embedded model as shipped."),
        "after the default `dpok train`": (str(run / "lora"), f"`dpok train --prompt \"{args.prompt}\"` with "
                                           "nothing else (the defaults, 800 reward queries), its LoRA."),
    }
    data = {"cpu": cpu_info(), "train_seconds": train_s,
            "settings": {"prompt": args.prompt, "steps": STEPS, "eta": ETA, "guidance": GUIDANCE,
                         "trajectories": args.trajectories, "branches": args.branches, "seed": args.seed},
            "models": {}}
    for name, (lora, what) in models.items():
        print(f"{name}:", flush=True)
        rows = analyse("shapeworld", lora, args.prompt, args.trajectories, args.branches, steps, args.seed)
        data["models"][name] = {"lora": bool(lora), "what": what, "rows": rows,
                                **({"beta": run_beta(run)} if lora else {})}
    (out / "data.json").write_text(json.dumps(data, indent=1) + "\n")
    write_report(data, out, docs)
    print(f"wrote {docs / 'decision_steps.md'}")


if __name__ == "__main__":
    main()
