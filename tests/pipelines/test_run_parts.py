"""The parts of a run built outside the trainer (as a test or a notebook would) and handed to it:
the same run, bit for bit, as the trainer building them itself; a part can be replaced."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from dpok.config import build_config
from dpok.rewards import make_reward
from dpok.run_parts import build_run
from dpok.trainer import Trainer


def _cfg(pipeline: Path, out: Path):  # noqa: ANN202
    return build_config(None, dict(model=str(pipeline), reward="jpeg-compressibility", prompt=["a red circle"],
                                   output_dir=str(out), rounds=2, samples_per_round=2, num_steps=2, eval_images=1,
                                   learning_rate=1e-2, report_to=["none"]))


def test_parts_built_outside_the_trainer_run_the_same(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    Trainer(_cfg(tiny_pipeline_dir, tmp_path / "own")).run()
    parts = build_run(_cfg(tiny_pipeline_dir, tmp_path / "given"))
    trainer = Trainer(None, parts=parts)
    assert trainer.adapter is parts.adapter and trainer.cfg is parts.cfg and trainer.round == 0
    trainer.run()
    name = "lora/pytorch_lora_weights.safetensors"
    own, given = load_file(tmp_path / "own" / name), load_file(tmp_path / "given" / name)
    assert own.keys() == given.keys() and all(torch.equal(own[k], given[k]) for k in own)
    rows = [[json.loads(line)["reward/mean"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("own", "given")]
    assert rows[0] == rows[1]


def test_a_part_can_be_replaced_before_the_run(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    cfg = build_config(None, dict(model=str(tiny_pipeline_dir), reward="jpeg-compressibility", prompt=["a red circle"],
                                  output_dir=str(tmp_path / "run"), rounds=1, samples_per_round=2, num_steps=2,
                                  eval_images=1, report_to=["none"]))
    parts = build_run(cfg, reward=make_reward("jpeg-incompressibility"))
    assert parts.reward.name == "jpeg-incompressibility" and parts.is_main and parts.out.is_dir()
    result = Trainer(None, parts=parts).run()
    assert result.reward_before > 0  # incompressibility: plus the JPEG size


def test_the_automatic_evaluation_size_is_resolved_with_the_prompts(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    cfg = build_config(None, dict(model=str(tiny_pipeline_dir), reward="jpeg-compressibility",
                                  prompt=["a red circle", "a blue square"], output_dir=str(tmp_path / "run"), rounds=4,
                                  samples_per_round=8, num_steps=2, report_to=["none"]))
    assert cfg.eval_images == 0
    parts = build_run(cfg)
    assert parts.cfg.eval_images == 2  # 4 rounds x 8 samples / (8 x 2 shown prompts)
    given = build_run(build_config(None, {**cfg.to_dict(), "eval_images": 5, "output_dir": str(tmp_path / "b")}))
    assert given.cfg.eval_images == 5
