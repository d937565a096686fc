"""``dpok eval``: mean reward per prompt for a model with or without LoRA, on seen and unseen prompts."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import option
from .generate import generate_images, load_model
from .prompts import resolve_prompts
from .rewards import make_reward
from .viz import save_prompt_grid

_f = option


@dataclass
class EvalConfig:
    """Settings of ``dpok eval``."""

    model: str = _f("shapeworld", "pipeline folder, hub id, or 'shapeworld'")
    lora: str = _f("", "LoRA folder of a run to evaluate (empty: the base model)")
    reward: str = _f("shapeworld-alignment", "reward name or spec")
    alignment_model: str = _f("", "folder of the shapeworld-alignment weights (default: shipped)")
    prompt: list[str] = field(default_factory=list, metadata={"help": "a seen prompt (repeatable)"})
    prompt_file: str = _f("", "file of seen prompts")
    prompt_set: str = _f("", "named set of seen prompts (default: 'seen' on ShapeWorld)")
    unseen_prompt_set: str = _f("", "named set of unseen prompts (default: 'unseen' on ShapeWorld)")
    unseen_prompt_file: str = _f("", "file of unseen prompts")
    num_images: int = _f(16, "images per prompt")
    seed: int = _f(0, "seed")
    num_steps: int = _f(20, "DDIM steps")
    guidance_scale: float = _f(5.0, "guidance scale")
    eta: float = _f(1.0, "DDIM eta")
    output_dir: str = _f("eval", "folder for eval.json and the grids")
    device: str = _f("auto", "'auto', 'cpu' or 'cuda[:N]'")

    def splits(self) -> dict[str, list[str]]:
        grammar = "shapeworld" if self.model == "shapeworld" else None
        seen_given = self.prompt or self.prompt_file or self.prompt_set
        seen_set = self.prompt_set or ("seen" if not seen_given and grammar else "")
        splits = {"seen": resolve_prompts(self.prompt or None, self.prompt_file or None, seen_set or None, grammar)}
        unseen_set = self.unseen_prompt_set or ("unseen" if not seen_given and grammar else "")
        if unseen_set or self.unseen_prompt_file:
            splits["unseen"] = resolve_prompts(None, self.unseen_prompt_file or None, unseen_set or None, grammar)
        return splits


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    if cfg.num_images < 1 or cfg.num_steps < 1:
        raise ValueError("--num-images and --num-steps must be >= 1")
    splits = cfg.splits()
    options = {"alignment_model": cfg.alignment_model} if cfg.alignment_model else {}
    reward = make_reward(cfg.reward, **options)
    reward.validate_prompts([p for ps in splits.values() for p in ps])
    adapter = load_model(cfg.model, cfg.lora, cfg.device)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"config": asdict(cfg), "splits": {}}
    for split, prompts in splits.items():
        per_prompt, rows = {}, []
        for i, prompt in enumerate(prompts):
            images = generate_images(adapter, prompt, cfg.num_images, cfg.seed + 1000 * i, cfg.num_steps,
                                     cfg.guidance_scale, cfg.eta)
            scored = reward(images, [prompt] * len(images))
            valid = scored.scores[scored.valid]
            per_prompt[prompt] = {"reward_mean": float(valid.mean()) if len(valid) else float("nan"),
                                  "reward_std": float(valid.std()) if len(valid) > 1 else 0.0,
                                  "invalid": scored.num_invalid, "diversity": diversity(images)}
            if cfg.model == "shapeworld" or cfg.reward.startswith("shapeworld"):
                per_prompt[prompt].update(shapeworld_judgement(images, prompt, cfg.seed + 1000 * i))
            rows.append(images[:8].permute(0, 2, 3, 1).numpy())
        mean = float(np.nanmean([v["reward_mean"] for v in per_prompt.values()]))
        result["splits"][split] = {"prompts": per_prompt, "reward_mean": mean}
        save_prompt_grid(rows, [f"{p}  ({per_prompt[p]['reward_mean']:.3f})" for p in prompts], out / f"grid_{split}.png")
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(f"\nwrote {out / 'eval.json'} and grid_<split>.png")
    return result


def diversity(images: torch.Tensor) -> float:
    """Mean pairwise RMS pixel distance between the images of one prompt (0: all identical)."""
    flat = images.flatten(1).float()
    if len(flat) < 2:
        return 0.0
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    n = len(flat)
    return float(d.sum() / (n * (n - 1)))


def shapeworld_judgement(images: torch.Tensor, prompt: str, seed: int) -> dict[str, float]:
    """Measures independent of every learned model: the geometric judge's aligned and clean
    shares, and the Fréchet distance of hand-built features to as many true renders of the prompt."""
    from .shapeworld import render_prompt
    from .shapeworld.judge import is_aligned, judge
    from .shapeworld.quality import frechet_distance, image_features

    arrays = images.permute(0, 2, 3, 1).numpy()
    rng = np.random.default_rng(seed)
    renders = [render_prompt(prompt, rng)[0] for _ in range(max(len(arrays), 32))]
    fd = frechet_distance(np.stack([image_features(a) for a in arrays]), np.stack([image_features(r) for r in renders]))
    return {"judge_aligned": float(np.mean([is_aligned(a, prompt) for a in arrays])),
            "clean_share": float(np.mean([judge(a).clean for a in arrays])), "frechet": fd}


def format_table(result: dict[str, Any]) -> str:
    def cell(v: dict[str, float], key: str) -> str:
        return f"{v[key]:8.3f}" if key in v else f"{'-':>8s}"

    lines = [f"{'split':7s} {'prompt':45s} {'reward':>8s} {'std':>7s} {'judge':>8s} {'clean':>8s} {'divers.':>8s} "
             f"{'FD':>8s}"]
    for split, data in result["splits"].items():
        for prompt, v in data["prompts"].items():
            lines.append(f"{split:7s} {prompt:45s} {v['reward_mean']:8.3f} {v['reward_std']:7.3f} "
                         f"{cell(v, 'judge_aligned')} {cell(v, 'clean_share')} {cell(v, 'diversity')} {cell(v, 'frechet')}")
        lines.append(f"{split:7s} {'(mean)':45s} {data['reward_mean']:8.3f}")
    return "\n".join(lines)
