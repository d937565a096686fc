"""What a training run leaves in its folder besides checkpoints and metrics: the config files, the
before/after grids, the trained weights (LoRA, kohya LoRA, or the UNet; the EMA ones beside them),
the curves, ``summary.json`` and the model card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import periodic_eval
from .config import TrainConfig
from .configfile import write_run_config
from .export import export_kohya, write_model_card
from .runlog import RunLog, plot_curves, read_metrics
from .utils.diskwrite import write_text_atomic
from .viz import save_prompt_grid

if TYPE_CHECKING:
    from .run_parts import RunParts


def write_config_files(cfg: TrainConfig, out: Path, config_format: str) -> None:
    """``config.<format>`` (yaml or toml) then ``config.json``; a resumed run writes a missing one again.

    config.<format> first: config.json marks a folder as holding a run, so a kill between the two
    leaves no run without its config file."""
    if not (cfg.resume and (out / f"config.{config_format}").exists()):
        write_run_config(cfg, out, config_format)
    if not cfg.resume:
        write_text_atomic(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")


def save_grid(out: Path, rows: list[np.ndarray], prompts: list[str], name: str, scores: dict[str, float],
              log: RunLog | None, round_: int) -> Path:
    """The grid ``out/name`` of image rows (N, H, W, 3), one per prompt labelled with its reward."""
    labels = [f"{p}  (reward {scores[p]:.3f})" for p in prompts]
    path = save_prompt_grid(rows, labels, out / name)
    if log is not None:
        log.log_png(f"samples/{Path(name).stem.removeprefix('samples_')}", path, round_)
    return path


def save_weights(parts: RunParts) -> dict[str, str]:
    """The trained weights (LoRA and its kohya copy, or the UNet / a flow model's transformer) and the
    EMA ones; ``{name: relative path}``."""
    out, cfg, files = parts.out, parts.cfg, {}
    lora = parts.algorithm.trains and cfg.finetune == "lora"
    # kohya's format names UNet modules; a flow model's diffusers-format LoRA is what its tools read
    kohya = cfg.kohya_lora and not parts.adapter.is_flow
    network = "transformer" if parts.adapter.is_flow else "unet"
    if lora:
        parts.adapter.save_lora(out / "lora")
        files["lora"] = "lora/pytorch_lora_weights.safetensors"
        if kohya:
            files["lora_kohya"] = str(export_kohya(out).relative_to(out))
        files["model_card"] = "lora/README.md"
    elif parts.algorithm.trains:
        parts.adapter.unet.save_pretrained(out / network)
        files[network] = f"{network}/"
    if parts.ema is not None and parts.algorithm.trains:  # the EMA weights beside the raw ones
        with parts.ema.applied():
            if lora:
                parts.adapter.save_lora(out / "lora_ema")
                files["lora_ema"] = "lora_ema/pytorch_lora_weights.safetensors"
                if kohya:
                    files["lora_ema_kohya"] = str(export_kohya(out / "lora_ema").relative_to(out))
            else:
                parts.adapter.unet.save_pretrained(out / f"{network}_ema")
                files[f"{network}_ema"] = f"{network}_ema/"
    return files


def save_outputs(parts: RunParts, log: RunLog, before: dict[str, float], after: dict[str, float], rounds: int,
                 reward_queries: int, config_format: str) -> dict[str, str]:
    """Everything a finished run writes (main process), ``summary.json`` last but the model card;
    closes ``log``. Returns ``{name: path relative to the run folder}``."""
    out, cfg = parts.out, parts.cfg
    files = {"config": "config.json", "config_file": f"config.{config_format}", "metrics": "metrics.jsonl",
             "tensorboard": "tensorboard/",
             "samples_before": "samples_before.png", "samples_after": "samples_after.png"}
    files.update(save_weights(parts))
    if plot_curves(log.path, out / "curves.png"):
        files["curves"] = "curves.png"
    evals = read_metrics(out / "eval.jsonl")
    if evals:
        files.update({"eval": "eval.jsonl", "eval_grids": "eval/"})
        if periodic_eval.plot_eval_curves(out / "eval.jsonl", out / "eval_curves.png"):
            files["eval_curves"] = "eval_curves.png"
    summary = {"reward_before": before, "reward_after": after,
               "reward_before_mean": float(np.mean(list(before.values()))),
               "reward_after_mean": float(np.mean(list(after.values()))),
               "eval_images_per_prompt": cfg.eval_images, "rounds": rounds,
               "reward_queries": reward_queries,
               "reward_queries_per_eval_image": parts.algorithm.reward_queries_per_image(),
               "eval_last": evals[-1] if evals else None,
               "evaluated_weights": "ema" if parts.ema is not None else "raw", "files": files}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    files["summary"] = "summary.json"
    if "lora" in files:
        write_model_card(out)
    log.close()
    return files
