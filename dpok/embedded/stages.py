"""Plumbing shared by the pretraining recipes of both embedded models (``pretrain`` for the DDIM
model, ``pretrain_flow`` for the flow-matching one): the stage context and log, the resumable
training loop, checkpoints and checksums."""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..shapeworld import prompt_sets
from ..shapeworld.distribution import sample_training_example
from ..utils.state_io import is_complete, load_state, rng_state, save_state, set_rng_state
from .pretrain_config import PretrainConfig

DOMAIN_MODULE = "dpok.shapeworld.domain"


class StageInterrupted(RuntimeError):
    """A stage stopped early on purpose, with its checkpoint written."""


class Context:
    """Shared plumbing of the stages: folders, log, metrics."""

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.work = Path(cfg.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.work / "pretrain.log"
        self.metrics_path = self.work / "metrics.jsonl"

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        tqdm.write(line)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def metrics(self, stage: str, step: int, values: dict[str, float]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"stage": stage, "step": step, **values}) + "\n")

    def stage_dir(self, name: str) -> Path:
        return self.work / name

    def done(self, name: str) -> bool:
        return (self.stage_dir(name) / "DONE").is_file()

    def mark_done(self, name: str) -> None:
        (self.stage_dir(name) / "DONE").write_text(time.strftime("%Y-%m-%d %H:%M:%S") + "\n")


def _lr_lambda(total: int, warmup: int, floor: float = 0.05) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def train_loop(
    ctx: Context,
    name: str,
    modules: dict[str, Any],
    params: list[nn.Parameter],
    lr: float,
    total_steps: int,
    step_fn: Callable[[int], dict[str, float]],
    data_rng: np.random.Generator,
    eval_fn: Callable[[int], dict[str, float]] | None = None,
    warmup: int = 100,
    after_step: Callable[[], None] | None = None,
) -> None:
    """Resumable loop: AdamW + warm-up/cosine LR, grad clipping, checkpoints, progress and logs.

    ``step_fn(step)`` returns a dict with a differentiable ``loss`` tensor and float metrics.
    """
    cfg = ctx.cfg
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, min(warmup, total_steps)))
    ckpt = ctx.stage_dir(name) / "checkpoint"
    start = 0
    if is_complete(ckpt):
        state = load_state(ckpt)
        for key, module in modules.items():
            module.load_state_dict(state["modules"][key])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], data_rng)
        start = int(state["step"])
        ctx.log(f"{name}: resumed from {ckpt} at step {start}")

    def save(step: int) -> None:
        save_state(ckpt, {
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(data_rng),
            "step": step,
        })

    t0 = time.time()
    bar = tqdm(range(start, total_steps), desc=name, initial=start, total=total_steps, dynamic_ncols=True,
               mininterval=2.0, file=sys.stderr)
    for step in bar:
        if cfg.max_steps_per_run and step - start >= cfg.max_steps_per_run:
            save(step)
            bar.close()
            raise StageInterrupted(f"{name}: stopped after {cfg.max_steps_per_run} steps at step {step} "
                                   f"(--max-steps-per-run); run the same command again to resume")
        out = step_fn(step)
        loss = out.pop("loss")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 50 == 0:
            ctx.metrics(name, step + 1, {"loss": loss.item(), "grad_norm": float(grad_norm),
                                          "lr": scheduler.get_last_lr()[0], **out})
        if eval_fn is not None and ((step + 1) % cfg.eval_every == 0 or step + 1 == total_steps):
            values = eval_fn(step + 1)
            ctx.metrics(name, step + 1, {f"eval/{k}": v for k, v in values.items()})
            ctx.log(f"{name} step {step + 1}/{total_steps} ({time.time() - t0:.0f}s): loss {loss.item():.4f} "
                    + " ".join(f"{k} {v:.3f}" for k, v in values.items()))
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total_steps:
            save(step + 1)
    bar.close()
    ctx.log(f"{name}: {total_steps - start} steps in {time.time() - t0:.0f}s")


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) images -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def _tokenize(tokenizer, texts: list[str]) -> torch.Tensor:  # noqa: ANN001
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _monitor_prompts() -> dict[str, list[str]]:
    sets = prompt_sets()
    return {"common": sets["common"][::3], "rare": sets["rare"][::2], "count4": sets["count4"][::4],
            "heldout": sets["heldout"][::2]}


def _shown(path: Path) -> str:
    """A path for logs: relative to the working directory when inside it (logs ship with the model)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(folder: Path) -> None:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    lines = [f"{sha256(p)}  {p.relative_to(folder).as_posix()}" for p in files]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def _run_stages(ctx: Context, runners: dict[str, Callable[[], None]], order: tuple[str, ...]) -> int:
    cfg = ctx.cfg
    t_all = time.time()
    for name in order:
        if name not in cfg.stage_list():
            continue
        if ctx.done(name) and name not in ("export", "report"):
            ctx.log(f"{name}: already done in {ctx.stage_dir(name)}, skipped")
            continue
        ctx.stage_dir(name).mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        runners[name]()
        ctx.mark_done(name)
        ctx.log(f"{name}: finished in {time.time() - t0:.0f}s")
    ctx.log(f"pretrain: all requested stages done in {time.time() - t_all:.0f}s")
    return 0


def encode_latent_pool(ctx: Context, stage: str, vae, tok) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Render and VAE-encode the denoiser's training images once (latent mean and std, token ids),
    kept in ``work_dir/<stage>/latent_pool``."""
    path = ctx.stage_dir(stage) / "latent_pool"
    if is_complete(path):
        return load_state(path)
    cfg = ctx.cfg
    rng = np.random.default_rng([cfg.seed, 4])
    means, stds, ids = [], [], []
    for start in tqdm(range(0, cfg.latent_pool, 256), desc="encode pool", file=sys.stderr, mininterval=2.0):
        n = min(256, cfg.latent_pool - start)
        examples = [sample_training_example(rng) for _ in range(n)]
        with torch.no_grad():
            dist = vae.encode(to_tensor([e[0] for e in examples]) * 2 - 1).latent_dist
        # contiguous (NCHW): the VAE hands back channels-last views, and a pool reloaded from disk is
        # contiguous; the UNet's convolutions round differently in the two layouts, so a resumed run
        # would drift from an uninterrupted one in the last bits
        means.append(dist.mean.contiguous())
        stds.append(dist.std.contiguous())
        ids.append(_tokenize(tok, [e[1] for e in examples]))
    pool = {"mean": torch.cat(means), "std": torch.cat(stds), "input_ids": torch.cat(ids)}
    save_state(path, pool)
    ctx.log(f"{stage}: encoded a pool of {cfg.latent_pool} pretraining images")
    return pool
