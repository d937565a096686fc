"""``--eval-every``: fixed-noise evaluations during training, logged as eval/*, with grids and curves;
they change nothing in the training itself and resume exactly."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpok.adapter import DiffusionAdapter
from dpok.config import build_config
from dpok.periodic_eval import evaluate_policy, make_plan
from dpok.rewards import make_reward
from dpok.shapeworld.domain import DOMAIN as SHAPEWORLD
from dpok.trainer import Trainer

SEEN = ["a red circle", "two blue squares"]
REWARD = "shapeworld-alignment+jpeg-compressibility"  # the tiny alignment net alone scores every image alike
UNSEEN = ["a green triangle"]


def _cfg(pipeline: Path, reward_dir: Path, out: Path, **kw: object):  # noqa: ANN202
    values = dict(model=str(pipeline), alignment_model=str(reward_dir), reward=REWARD, prompt=SEEN, eval_prompt=UNSEEN,
                  output_dir=str(out), rounds=3, samples_per_round=2, gradient_steps=2, num_steps=2, eval_images=1,
                  learning_rate=1e-2, clip_range=0.1, eval_every=2, eval_every_images=2)
    values.update(kw)
    return build_config(None, values)


def _lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "lora" / "pytorch_lora_weights.safetensors")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_every_logs_fixed_noise_curves_and_leaves_training_unchanged(tiny_pipeline_dir: Path, tiny_reward_dir: Path,
                                                                        tmp_path: Path) -> None:
    run = tmp_path / "eval"
    Trainer(_cfg(tiny_pipeline_dir, tiny_reward_dir, run)).run()
    rows = _rows(run / "eval.jsonl")
    assert [r["round"] for r in rows] == [0, 2, 3]  # the base, every 2 rounds, the last round
    for split in ("seen", "unseen"):
        for measure in ("reward_mean", "kl_to_base", "diversity", "judge_aligned", "clean_share", "frechet"):
            assert all(isinstance(r[f"eval/{split}/{measure}"], float) for r in rows), (split, measure)
    assert rows[0]["eval/seen/kl_to_base"] == 0.0 < rows[-1]["eval/seen/kl_to_base"]  # base, then the trained policy
    assert [p.name for p in sorted((run / "eval").iterdir())] == ["round-000000.png", "round-000002.png",
                                                                  "round-000003.png"]
    assert (run / "eval_curves.png").stat().st_size > 1000
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_last"] == rows[-1] and summary["files"]["eval_curves"] == "eval_curves.png"
    assert "after round 3" in (run / "lora" / "README.md").read_text()  # the model card shows the last evaluation
    # the evaluations use their own noise: training is the same bit for bit without them
    plain = tmp_path / "plain"
    Trainer(_cfg(tiny_pipeline_dir, tiny_reward_dir, plain, eval_every=0)).run()
    a, b = _lora(run), _lora(plain)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (plain / "eval.jsonl").exists()


def test_the_same_weights_score_the_same_at_every_evaluation(tiny_pipeline_dir: Path, tiny_reward_dir: Path) -> None:
    adapter = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    reward = make_reward(REWARD, alignment_model=str(tiny_reward_dir))
    plan = make_plan(SEEN, UNSEEN, images=2, num_steps=2, guidance_scale=5.0, eta=1.0, seed=0, domain=SHAPEWORLD)
    first, rows, labels = evaluate_policy(adapter, reward, plan)
    again, rows_again, _ = evaluate_policy(adapter, reward, plan)
    assert first == again and all((x == y).all() for x, y in zip(rows, rows_again))  # fixed noise
    assert len(rows) == len(labels) == 3 and labels[-1].startswith("unseen: a green triangle")
    other, _, _ = evaluate_policy(adapter, reward, make_plan(SEEN, UNSEEN, 2, 2, 5.0, 1.0, seed=1, domain=SHAPEWORLD))
    assert other != first  # the seed sets the noise


def test_a_resumed_run_evaluates_as_the_uninterrupted_one(tiny_pipeline_dir: Path, tiny_reward_dir: Path,
                                                          tmp_path: Path) -> None:
    straight = tmp_path / "a"
    Trainer(_cfg(tiny_pipeline_dir, tiny_reward_dir, straight, eval_every=1, rounds=2)).run()
    run = tmp_path / "b"
    interrupted = Trainer(_cfg(tiny_pipeline_dir, tiny_reward_dir, run, eval_every=1, rounds=2))
    interrupted.stop_signal = signal.SIGTERM
    with pytest.raises(SystemExit):
        interrupted.run()
    assert [r["round"] for r in _rows(run / "eval.jsonl")] == [0, 1]
    Trainer(_cfg(tiny_pipeline_dir, tiny_reward_dir, run, eval_every=1, rounds=2, resume=str(run))).run()
    assert _rows(run / "eval.jsonl") == _rows(straight / "eval.jsonl")
    assert [r["round"] for r in _rows(run / "eval.jsonl")] == [0, 1, 2]


def test_eval_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="--eval-every must be >= 0"):
        build_config(None, {"eval_every": -1})
    with pytest.raises(ValueError, match="--eval-every-images must be >= 1"):
        build_config(None, {"eval_every_images": 0})
