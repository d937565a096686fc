"""Chaos test of training (benchmarks/chaos_train.py): kill -9 at random moments, resume, compare bit for bit."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and SIGKILL")


def _load():  # noqa: ANN202
    return load_benchmark("chaos_train")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Forked children and the reference run with one torch thread (fork-safe, and the same for all)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chaos(tmp_path: Path, pipeline: Path, reward: Path, kills: int, rounds: int, seed: int, fork: bool = True):  # noqa: ANN202
    chaos = _load()
    result = chaos.chaos_run(chaos.tiny_train_argv(pipeline, reward, rounds), tmp_path, kills, rounds, seed, fork=fork)
    print(chaos.describe(result))
    assert result.identical, chaos.describe(result) + "\n" + "\n".join(result.schedule)
    assert result.kills == kills
    return result


def test_killed_runs_resume_bit_identically(tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path: Path,
                                            one_thread: None) -> None:
    result = _chaos(tmp_path, tiny_pipeline_dir, tiny_reward_dir, kills=5, rounds=4, seed=3)
    assert len(result.by_phase) >= 3  # the kills came in different phases


@pytest.mark.slow
def test_thirty_kills_in_every_phase(tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path: Path,
                                     one_thread: None) -> None:
    chaos = _load()
    result = _chaos(tmp_path, tiny_pipeline_dir, tiny_reward_dir, kills=30, rounds=24, seed=0)
    assert set(result.by_phase) == set(chaos.PHASES)


@pytest.mark.slow
def test_killed_subprocesses_resume_bit_identically(tiny_pipeline_dir: Path, tiny_reward_dir: Path,
                                                    tmp_path: Path) -> None:
    _chaos(tmp_path, tiny_pipeline_dir, tiny_reward_dir, kills=3, rounds=3, seed=1, fork=False)
