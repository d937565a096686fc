"""``dpok eval``: how good a model (with or without LoRA) is, per prompt and per split (seen / unseen).

Per prompt: the training reward (mean, std, invalid count); the diversity (mean pairwise RMS
distance); the KL to the base model along the sampled trajectories; on ShapeWorld also an
alignment judge that shares no weights with the reward (exact geometry of the drawn objects), the
share of images whose objects are clean shapes, and a Fréchet distance to true renders.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapter import DiffusionAdapter
from .domains import Domain, domain_for
from .options import group, option, option_errors, to_options
from .prompts import prompt_metadata, resolve_prompts
from .rewards import Reward
from .rewards.base import PromptMetadataReward
from .rewards.config import RewardConfig
from .sampling import SampleSettings, Trajectory, sample_in_batches, trajectory_kl
from .viz import save_prompt_grid

_f = option
MEASURES = ("reward_mean", "judge_aligned", "clean_share", "frechet", "diversity", "kl_to_base")


@dataclass
class EvalConfig:
    """Settings of ``dpok eval``."""

    model: str = _f("shapeworld", "pipeline folder, hub id, 'shapeworld' or 'shapeworld-flow'")
    lora: str = _f("", "LoRA folder of a run to evaluate (empty: the base model)")
    reward: RewardConfig = group(RewardConfig)
    prompt: list[str] = field(default_factory=list, metadata={"help": "a seen prompt (repeatable)"})
    prompt_file: str = _f("", "file of seen prompts (text, or .jsonl with metadata)")
    prompt_set: str = _f("", "named set of seen prompts (default: 'seen' on ShapeWorld)")
    unseen_prompt_set: str = _f("", "named set of unseen prompts (default: 'unseen' on ShapeWorld)")
    unseen_prompt_file: str = _f("", "file of unseen prompts")
    num_images: int = _f(16, "images per prompt")
    seed: int = _f(0, "seed")
    num_steps: int = _f(20, "DDIM steps")
    guidance_scale: float = _f(5.0, "guidance scale")
    eta: float = _f(1.0, "DDIM eta (flow models: the SDE noise level a); 0 = the deterministic sampler (DDIM, or the "
                        "flow pipeline's Euler ODE: what plain diffusers draws), whose KL to the base is not measured")
    output_dir: str = _f("eval", "folder for eval.json and the grids")
    device: str = _f("auto", "'auto', 'cpu' or 'cuda[:N]'")

    def domain(self) -> Domain | None:
        """The model's domain, else the reward's (see :mod:`dpok.domains`)."""
        return domain_for(self.model, self.reward.name)

    def splits(self) -> dict[str, list[str]]:
        domain = self.domain()
        seen_given = self.prompt or self.prompt_file or self.prompt_set
        seen_default, unseen_default = domain.eval_sets if domain is not None and not seen_given else ("", "")
        seen_set = self.prompt_set or seen_default
        splits = {"seen": resolve_prompts(self.prompt or None, self.prompt_file or None, seen_set or None, domain)}
        unseen_set = self.unseen_prompt_set or unseen_default
        if unseen_set or self.unseen_prompt_file:
            splits["unseen"] = resolve_prompts(None, self.unseen_prompt_file or None, unseen_set or None, domain)
        return splits


    def validate(self) -> None:
        """Check every value before any model loads; raise ValueError naming the option."""
        errors = option_errors(self) + self.reward.validate()
        if self.num_images < 1 or self.num_steps < 1:
            errors.append("--num-images and --num-steps must be >= 1")
        if self.eta < 0:
            errors.append(f"--eta must be >= 0 (got {self.eta}); 0 is the deterministic sampler")
        if self.guidance_scale < 1:
            errors.append(f"--guidance-scale must be >= 1 (got {self.guidance_scale})")
        if errors:
            raise ValueError("invalid settings:\n  " + "\n  ".join(errors))


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    cfg.validate()
    domain = cfg.domain()
    splits = cfg.splits()
    reward = cfg.reward.build()
    if reward.uses_metadata:  # the metadata of .jsonl prompt files' prompts
        table = {prompt: meta for file in (cfg.prompt_file, cfg.unseen_prompt_file) if file
                 for prompt, meta in prompt_metadata(file, domain).items()}
        reward = PromptMetadataReward(reward, table)
    reward.validate_prompts([p for ps in splits.values() for p in ps])
    adapter = DiffusionAdapter.load(cfg.model, cfg.lora, cfg.device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = SampleSettings(cfg.num_images, cfg.num_steps, cfg.guidance_scale, cfg.eta)
    result: dict[str, Any] = {"config": to_options(cfg), "splits": {}}
    for split, prompts in splits.items():
        per_prompt, rows = {}, []
        for i, prompt in enumerate(prompts):
            seed = cfg.seed + 1000 * i
            per_prompt[prompt], images = evaluate_prompt(adapter, reward, prompt, settings, seed, domain)
            rows.append(images[:8].permute(0, 2, 3, 1).numpy())
            grid = out / "grids" / f"{split}_{i:02d}_{slug(prompt)}.png"
            save_prompt_grid([images.permute(0, 2, 3, 1).numpy()], [prompt_label(prompt, per_prompt[prompt])], grid)
        result["splits"][split] = {"prompts": per_prompt, **split_means(per_prompt)}
        save_prompt_grid(rows, [prompt_label(p, per_prompt[p]) for p in prompts], out / f"grid_{split}.png")
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"\nwrote {out / 'eval.json'}, grid_<split>.png and grids/ (one per prompt)")
    return result


def sample_prompt(adapter: DiffusionAdapter, prompt: str, settings: SampleSettings, seed: int) -> Trajectory:
    """``num_images`` trajectories of one prompt from one seeded generator (the pipeline's own
    trajectories: the sampler is tested equal to the diffusers pipeline)."""
    gen = torch.Generator().manual_seed(seed)
    return sample_in_batches(adapter, [prompt] * settings.num_images, settings.batch_size, settings.num_steps,
                             settings.eta, settings.guidance_scale, gen, with_log_probs=settings.eta > 0)


def evaluate_prompt(adapter: DiffusionAdapter, reward: Reward, prompt: str, settings: SampleSettings, seed: int,
                    domain: Domain | None, images: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Every measure for one prompt: reward (mean, std, invalid), diversity, KL to the base along the
    sampled trajectories and the ``domain``'s own measures (e.g. an independent judge). Give
    ``images`` (N, 3, H, W) to evaluate a method that is not a sampler of this
    model (e.g. best-of-n); its KL is then reported as NaN (not measured), as it is at eta 0, where
    the deterministic steps have no step distributions to compare."""
    if images is None:
        traj = sample_prompt(adapter, prompt, settings, seed)
        stochastic = settings.eta > 0
        images = traj.images
        kl = trajectory_kl(adapter, traj, settings) if stochastic else torch.full((len(images),), float("nan"))
    else:
        kl = torch.full((len(images),), float("nan"))
    scored = reward(images, [prompt] * len(images))
    valid = scored.scores[scored.valid]
    row = {"reward_mean": float(valid.mean()) if len(valid) else float("nan"),
           "reward_std": float(valid.std()) if len(valid) > 1 else 0.0,
           "invalid": scored.num_invalid, "diversity": diversity(images),
           "kl_to_base": float(kl.mean()), "kl_to_base_std": float(kl.std()) if len(kl) > 1 else 0.0}
    if domain is not None:
        row.update(domain.measures(images, prompt, seed))
    return row, images


def split_means(per_prompt: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean of each measure over the prompts of a split (``reward_mean`` stays the mean reward)."""
    keys = [k for k in MEASURES if all(k in v for v in per_prompt.values())]
    return {("reward_mean" if k == "reward_mean" else f"{k}_mean"): float(np.nanmean([v[k] for v in per_prompt.values()]))
            for k in keys}


def slug(prompt: str) -> str:
    return "-".join(prompt.split())[:60]


def prompt_label(prompt: str, row: dict[str, float]) -> str:
    text = f"{prompt}  reward {row['reward_mean']:.3f}"
    if "judge_aligned" in row:
        text += f"  judge {row['judge_aligned']:.2f}"
    return text


def diversity(images: torch.Tensor) -> float:
    """Mean pairwise RMS pixel distance between the images of one prompt (0: all identical)."""
    flat = images.flatten(1).float()
    if len(flat) < 2:
        return 0.0
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    n = len(flat)
    return float(d.sum() / (n * (n - 1)))


def format_table(result: dict[str, Any]) -> str:
    def cell(v: dict[str, float], key: str) -> str:
        return f"{v[key]:8.3f}" if key in v else f"{'-':>8s}"

    lines = [f"{'split':7s} {'prompt':45s} {'reward':>8s} {'std':>7s} {'judge':>8s} {'clean':>8s} {'FD':>8s} "
             f"{'divers.':>8s} {'KL':>8s}"]
    for split, data in result["splits"].items():
        for prompt, v in data["prompts"].items():
            lines.append(f"{split:7s} {prompt:45s} {v['reward_mean']:8.3f} {v['reward_std']:7.3f} "
                         + " ".join(cell(v, k) for k in ("judge_aligned", "clean_share", "frechet", "diversity", "kl_to_base")))
        means = {k: data[k if k == "reward_mean" else f"{k}_mean"] for k in MEASURES
                 if (k if k == "reward_mean" else f"{k}_mean") in data}
        lines.append(f"{split:7s} {'(mean)':45s} {means['reward_mean']:8.3f} {'':7s} "
                     + " ".join(cell(means, k) for k in ("judge_aligned", "clean_share", "frechet", "diversity", "kl_to_base")))
    return "\n".join(lines + flaw_lines(result))


def flaw_lines(result: dict[str, Any]) -> list[str]:
    """Why the judge found images misaligned: per prompt, the share of images with each flaw the
    domain's judge names (``judge_<flaw>`` measures, e.g. ShapeWorld's ``missing`` and ``extra``);
    nothing for a domain without them."""
    rows = [(split, prompt, v) for split, data in result["splits"].items() for prompt, v in data["prompts"].items()]
    names = sorted({k[len("judge_"):] for _, _, v in rows for k in v if k.startswith("judge_") and k != "judge_aligned"})
    if not names:
        return []
    lines = ["", "why misaligned (share of images with each flaw; an image may have several):",
             f"{'split':7s} {'prompt':45s} " + " ".join(f"{n:>12s}" for n in names)]
    for split, prompt, v in rows:
        lines.append(f"{split:7s} {prompt:45s} " + " ".join(
            f"{v[f'judge_{n}']:12.3f}" if f"judge_{n}" in v else f"{'-':>12s}" for n in names))
    return lines
