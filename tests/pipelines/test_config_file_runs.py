"""A run from a YAML file equals bit for bit the same run from options, and its config.yaml rebuilds the run's config."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dpok.cli import build_parser, main, train_config
from dpok.config import TrainConfig


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _train_cfg(argv: list[str]) -> tuple[TrainConfig, str]:
    return train_config(build_parser().parse_args(["train", *argv]))


TINY = {"rounds": 2, "samples_per_round": 2, "num_steps": 2, "eval_images": 1, "gradient_steps": 2,
        "learning_rate": 1e-2, "clip_range": 0.1, "seed": 3}


def test_run_from_a_yaml_file_equals_the_run_from_options_bit_for_bit(tiny_pipeline_dir: Path, tiny_reward_dir: Path,
                                                                      tmp_path: Path) -> None:
    common = {"model": str(tiny_pipeline_dir), "alignment_model": str(tiny_reward_dir), **TINY}
    options = [f"--{k.replace('_', '-')}={v}" for k, v in common.items()]
    options += ["--prompt", "a red circle", "--prompt", "two blue squares"]
    assert main(["train", *options, "--output-dir", str(tmp_path / "a")]) == 0
    text = "".join(f"{k}: {v}\n" for k, v in common.items())
    text += f"prompt:\n  - a red circle\n  - two blue squares\noutput_dir: {tmp_path / 'b'}\n"
    assert main(["train", "--config", str(_write(tmp_path / "run.yaml", text))]) == 0
    a = load_file(tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # the runs trained
    strip = lambda run: [{k: v for k, v in json.loads(r).items() if not k.startswith("time/")}  # noqa: E731
                         for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert strip("a") == strip("b") and len(strip("a")) == 2
    # the run folder's config.yaml holds every resolved setting: it rebuilds exactly this run's config
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    rebuilt, _ = _train_cfg(["--config", str(tmp_path / "a" / "config.yaml"), "--output-dir", str(tmp_path / "a")])
    assert rebuilt.to_dict() == saved

