"""Multi-process (data-parallel) training: real two-process CPU runs launched with accelerate (gloo).

``accelerate launch --cpu`` starts several CPU processes only through MPI, so the runs here use
``--multi_gpu`` (torchrun underneath) with ``--device cpu``: dpok then forms a gloo process group.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpok.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        env.pop(key, None)  # a launcher's variables from outside must not leak into the runs
    return env


def _launch(processes: int, *args: str, kind: str = "--multi_gpu") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", kind, "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *args]


def _tiny_train(pipeline: Path, reward: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "dpok", "train", "--model", str(pipeline), "--reward", "shapeworld-alignment",
            "--alignment-model", str(reward), "--prompt", "a red circle", "--prompt", "two blue squares",
            "--algorithm", "dpok", "--samples-per-round", "4", "--sample-batch-size", "2", "--minibatch-size", "2",
            "--gradient-steps", "1", "--num-steps", "3", "--eval-images", "1", "--learning-rate", "0.01",
            "--clip-range", "0.1", "--device", "cpu", "--output-dir", str(out), *extra]


# --multi_gpu (torchrun) also starts the two processes of test_two_processes_update_like_one_process_...
@pytest.mark.parametrize("kind", ["--cpu", pytest.param("--multi_gpu", marks=pytest.mark.slow)])
def test_two_process_run_keeps_weights_in_sync_and_only_the_main_process_writes(
        tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path: Path, kind: str) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        _launch(2, *_tiny_train(tiny_pipeline_dir, tiny_reward_dir, out, "--rounds", "1"), kind=kind),
        capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if kind == "--cpu":  # accelerate starts one process without MPI; dpok starts the two gloo workers itself
        assert "starting 2 gloo workers" in proc.stderr
    assert proc.stdout.count("outputs in") == 1  # one report, from the main process
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "config.yaml", "curves.png", "lora",
                                                     "metrics.jsonl", "samples_after.png", "samples_before.png",
                                                     "summary.json", "tensorboard"]
    # one event file of scalars (the hyperparameters go to sub-folders): only the main process logs
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1]
    assert rows[0]["charts/reward_queries"] == 4.0  # the total over both processes
    assert json.loads((out / "summary.json").read_text())["reward_queries"] == 4

    path, state = latest_checkpoint(out)
    assert path.name == "round-000001" and state["num_processes"] == 2 and set(state["processes"]) == {1}
    other = state["processes"][1]
    # the LoRA and value-function weights of both processes were identical after the round
    assert other["weights_digest"] == state["weights_digest"]
    lora = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert lora and all(torch.isfinite(v).all() for v in lora.values())
    # ... while each process sampled its own prompts and noise: different seeds, different latents
    assert other["prompt_sampler"]["seed"] != state["prompt_sampler"]["seed"]
    assert not torch.equal(other["generator"], state["generator"])
    mine, theirs = state["algorithm"]["buffer"]["data"], other["algorithm"]["buffer"]["data"]
    assert not torch.allclose(mine["latents"][:3], theirs["latents"][:3])  # each buffer holds its own process's steps


@pytest.mark.slow
def test_a_resumed_two_process_run_continues_identically(tiny_pipeline_dir: Path, tiny_reward_dir: Path,
                                                         tmp_path: Path) -> None:
    def launch(*args: str) -> None:
        proc = subprocess.run(_launch(2, *args), capture_output=True, text=True, env=_env(), timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch(*_tiny_train(tiny_pipeline_dir, tiny_reward_dir, straight, "--rounds", "2"))
    launch(*_tiny_train(tiny_pipeline_dir, tiny_reward_dir, resumed, "--rounds", "1"))
    launch("-m", "dpok", "train", "--resume", str(resumed), "--rounds", "2")
    a = load_file(straight / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)

    def rows(folder: Path) -> list[dict]:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]

    assert rows(straight) == rows(resumed)
    # both processes' own states came back: the second round's replay buffers match too
    _, s_state = latest_checkpoint(straight)
    _, r_state = latest_checkpoint(resumed)
    for x, y in ((s_state, r_state), (s_state["processes"][1], r_state["processes"][1])):
        assert torch.equal(x["algorithm"]["buffer"]["data"]["latents"], y["algorithm"]["buffer"]["data"]["latents"])


def test_two_processes_update_like_one_process_with_the_same_total_batch(tiny_pipeline_dir: Path,
                                                                         tmp_path: Path) -> None:
    script = str(ROOT / "tests" / "distributed_update.py")
    one, two = tmp_path / "one", tmp_path / "two"
    single = subprocess.run([sys.executable, script, "--model", str(tiny_pipeline_dir), "--out", str(one)],
                            capture_output=True, text=True, env=_env(), timeout=300)
    assert single.returncode == 0, single.stderr[-4000:]
    pair = subprocess.run(_launch(2, script, "--model", str(tiny_pipeline_dir), "--out", str(two)),
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert pair.returncode == 0, pair.stderr[-4000:]
    reference = load_file(one / "sync-rank0.safetensors")
    rank0, rank1 = load_file(two / "sync-rank0.safetensors"), load_file(two / "sync-rank1.safetensors")
    assert reference.keys() == rank0.keys() == rank1.keys()
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # identical steps on both processes
    for k in reference:  # = the one-process update on all four samples, up to summation order
        torch.testing.assert_close(rank0[k], reference[k], atol=1e-5, rtol=1e-4)
    # without the gradient all-reduce each process would follow its own half of the batch
    apart0, apart1 = load_file(two / "nosync-rank0.safetensors"), load_file(two / "nosync-rank1.safetensors")
    assert max(float((apart0[k] - apart1[k]).abs().max()) for k in apart0) > 1e-3
    assert max(float((apart0[k] - reference[k]).abs().max()) for k in apart0) > 1e-3
    one_nosync = load_file(one / "nosync-rank0.safetensors")
    assert all(torch.equal(one_nosync[k], reference[k]) for k in reference)  # one process: nothing to all-reduce




