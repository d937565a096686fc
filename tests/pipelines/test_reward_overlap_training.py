"""Training with the reward scored beside the sampling (``--reward-overlap on``) is the training
without it, bit for bit: the same rewards in the same order (NaN scores masked the same way), the
same metrics.jsonl, the same LoRA; a failing reward stops both the same way, and the worker thread
never outlives its round."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpok.config import build_config
from dpok.rewards import RewardError
from dpok.rewards.custom import CustomReward
from dpok.scoring import THREAD_NAME
from dpok.trainer import Trainer


def _cfg(pipeline: Path, out: Path, overlap: str, **more):  # noqa: ANN003, ANN202
    return build_config(None, {**dict(model=str(pipeline), prompt=["a red circle", "a blue square"],
                                       output_dir=str(out), rounds=2, samples_per_round=4, sample_batch_size=2,
                                       num_steps=2, eval_images=1, gradient_steps=1, learning_rate=1e-2,
                                       report_to=["none"], reward_overlap=overlap), **more})


class Recorder:
    """Redness, NaN for the second image of every batch; records each call's prompts, scores and thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list[float], str]] = []

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))
        scores[1:2] = float("nan")
        self.calls.append((list(prompts), scores.tolist(), threading.current_thread().name))
        return scores


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_overlap_on_and_off_train_the_same_bit_for_bit(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    recorders, runs = {}, {}
    for mode in ("off", "on"):
        recorders[mode], runs[mode] = Recorder(), tmp_path / mode
        Trainer(_cfg(tiny_pipeline_dir, runs[mode], mode), reward=CustomReward("python:redness", recorders[mode])).run()
        assert not any(t.name.startswith(THREAD_NAME) for t in threading.enumerate())
    off, on = recorders["off"].calls, recorders["on"].calls
    # the same calls with the same scores, in the same order (NaN compares equal as text)
    assert [(p, str(s)) for p, s, _ in off] == [(p, str(s)) for p, s, _ in on]
    training = [t for _, _, t in on if t.startswith(THREAD_NAME)]
    assert len(training) == 4 and all(t == "MainThread" for _, _, t in off)  # 2 rounds x 2 batches, beside sampling
    assert _metrics(runs["off"]) == _metrics(runs["on"])
    assert all(row["reward/invalid"] == 2.0 for row in _metrics(runs["on"]))  # one NaN per batch, masked
    name = "lora/pytorch_lora_weights.safetensors"
    a, b = load_file(runs["off"] / name), load_file(runs["on"] / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (runs["on"] / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time/reward_busy_s"] >= 0 and r["time/kl_s"] >= 0 for r in rows)


@pytest.mark.parametrize("mode", ["off", "on"])
def test_a_failing_reward_stops_the_round_alike_and_keeps_the_earlier_rounds(mode: str, tiny_pipeline_dir: Path,
                                                                             tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr("time.sleep", lambda s: None)
    calls: list[int] = []

    def down_in_round_two(images: torch.Tensor, prompts: list[str]) -> list[float]:
        calls.append(len(prompts))
        if len(calls) > 4:  # the evaluation before (2 prompts), then round 1's two batches: round 2 fails
            raise RewardError("server down")
        return [0.5] * len(prompts)

    run = tmp_path / "run"
    trainer = Trainer(_cfg(tiny_pipeline_dir, run, mode, checkpoint_every=1, rounds=3),
                      reward=CustomReward("python:down", down_in_round_two))
    with pytest.raises(RewardError, match="round 2: scoring failed 3 times, last: server down.*--resume"):
        trainer.run()
    assert not any(t.name.startswith(THREAD_NAME) for t in threading.enumerate())
    assert [r["reward/mean"] for r in _metrics(run)] == [0.5]  # round 1 kept
    assert (run / "checkpoints").is_dir() and trainer.round == 1
