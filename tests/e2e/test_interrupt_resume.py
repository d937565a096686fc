"""A `dpok train` subprocess stopped by kill -9 or SIGTERM after a checkpoint, then resumed
with --resume: the same result as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpok.checkpoint import list_complete


def _train_cmd(pipeline: Path, reward: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dpok", "train", "--model", str(pipeline), "--alignment-model", str(reward),
            "--prompt", "a red circle", "--prompt", "two blue squares", "--rounds", "6", "--samples-per-round", "2",
            "--sample-batch-size", "2", "--minibatch-size", "2", "--gradient-steps", "2", "--num-steps", "3",
            "--eval-images", "1", "--learning-rate", "0.01", "--clip-range", "0.1", "--checkpoint-every", "1",
            "--output-dir", str(out)]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
            "OMP_NUM_THREADS": "1"}


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path, round_: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.name >= f"round-{round_:06d}" for p in list_complete(out)):
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow  # in the default suite: kill -9 in forked runs (test_chaos), SIGTERM in process (test_cli)
@pytest.mark.parametrize("how", ["kill-9", "sigterm"])
def test_interrupt_then_resume_matches_an_uninterrupted_run(tiny_pipeline_dir: Path, tiny_reward_dir: Path,
                                                             tmp_path: Path, how: str) -> None:
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(tiny_pipeline_dir, tiny_reward_dir, straight), check=True, env=_env(),
                   capture_output=True, timeout=600)
    run = tmp_path / "interrupted"
    proc = subprocess.Popen(_train_cmd(tiny_pipeline_dir, tiny_reward_dir, run), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(proc, run, 2)
    proc.send_signal(signal.SIGKILL if how == "kill-9" else signal.SIGTERM)
    proc.communicate(timeout=300)
    assert proc.returncode == (-9 if how == "kill-9" else 143)
    assert not (run / "lora").exists()  # it really stopped before the end
    resumed = subprocess.run([sys.executable, "-m", "dpok", "train", "--resume", str(run)], env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stdout + resumed.stderr
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def rows(folder: Path) -> list[dict]:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]

    assert rows(straight) == rows(run)

