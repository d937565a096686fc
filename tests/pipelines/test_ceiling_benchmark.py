"""benchmarks/ceiling.py: supervised fine-tuning on the world's own renders, judged along the way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

from dpok.shapeworld import PromptError


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("ceiling")


def test_a_tiny_ceiling_run_learns_from_renders_and_writes_its_report(bench, tmp_path: Path) -> None:
    argv = ["--prompts", "a red circle", "--seeds", "0", "--steps", "2", "--batch", "2", "--renders", "4",
            "--eval-every", "1", "--eval-images", "2", "--threads", "1", "--docs", str(tmp_path)]
    import torch

    threads = torch.get_num_threads()
    assert bench.main(argv) == 0
    assert torch.get_num_threads() == threads  # the tests after this one keep their thread setting
    result = json.loads((tmp_path / "ceiling" / "data" / "a-red-circle-seed0-steps2-lr0.0001.json").read_text())
    assert [p["step"] for p in result["curve"]] == [0, 1, 2]
    assert all(0 <= p["judge_aligned"] <= 1 for p in result["curve"])
    assert result["curve"][1]["loss"] > 0 and result["cpu"]["model"]
    report = (tmp_path / "ceiling.md").read_text()
    assert "| a red circle | 2 | 0.0001 | 1 |" in report and (tmp_path / "ceiling" / "curve.png").is_file()
    first = result["seconds"]
    assert bench.main(argv) == 0  # kept results of the same settings are not trained again
    assert json.loads((tmp_path / "ceiling" / "data" / "a-red-circle-seed0-steps2-lr0.0001.json").read_text())["seconds"] == first
    assert bench.main([*argv, "--lr", "3e-4"]) == 0  # another setting: its own result and row, the first kept
    assert len(list((tmp_path / "ceiling" / "data").glob("*.json"))) == 2
    report = (tmp_path / "ceiling.md").read_text()
    assert "| a red circle | 2 | 0.0001 | 1 |" in report and "| a red circle | 2 | 0.0003 | 1 |" in report


def test_the_denoiser_moves_towards_the_renders(bench) -> None:
    """A few steps at a large learning rate change what the model draws (the weights are trained)."""
    base = bench.supervised_ceiling("a red circle", 0, steps=3, lr=1e-2, batch=4, renders=4, eval_every=3,
                                    eval_images=2, log=lambda m: None)
    assert base["curve"][-1]["loss"] == base["curve"][-1]["loss"]  # finite
    assert base["curve"][0]["reward_mean"] != base["curve"][-1]["reward_mean"]


def test_a_prompt_outside_the_grammar_stops_before_training(bench, tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="purple dogs"):
        bench.main(["--prompts", "two purple dogs", "--docs", str(tmp_path)])
    assert not (tmp_path / "ceiling" / "data").exists() or not any((tmp_path / "ceiling" / "data").iterdir())


def test_the_report_needs_results(bench, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run benchmarks/ceiling.py first"):
        bench.main(["--report-only", "--docs", str(tmp_path)])
