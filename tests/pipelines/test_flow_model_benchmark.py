"""benchmarks/flow_model.py: its report reads both samplers' evaluations of every finished run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import load_benchmark
from PIL import Image

PROMPT = "two white triangles"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("flow_model")


def _eval(folder: Path, judge: float, reward: float, kl: float) -> None:
    folder.mkdir(parents=True)
    row = {"judge_aligned": judge, "clean_share": 0.75, "reward_mean": reward, "kl_to_base": kl}
    folder.joinpath("eval.json").write_text(json.dumps({"config": {"num_images": 64},
                                                        "splits": {"seen": {"prompts": {PROMPT: row}}}}))


def _finished_run(folder: Path, odes: tuple[float, float], sdes: tuple[float, float]) -> None:
    run = folder / "run"
    run.mkdir(parents=True)
    cfg = {"algorithm": "grpo", "rounds": 6, "samples_per_round": 32, "eta": 0.7, "num_steps": 20,
           "guidance_scale": 5.0, "learning_rate": 1e-3, "timestep_fraction": 0.4}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": i + 1, "reward/mean": 0.5 + 0.05 * i}) + "\n"
                                               for i in range(6)))
    for name in ("samples_before.png", "samples_after.png", "curves.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(run / name)
    (folder / "timing.json").write_text(json.dumps({"train_wall_s": 120.0}))
    for model, i in (("base", 0), ("tuned", 1)):
        _eval(folder / f"eval-{model}-ode", odes[i], 0.7 + 0.1 * i, float("nan"))
        _eval(folder / f"eval-{model}-sde", sdes[i], 0.6 + 0.1 * i, 0.0 if model == "base" else 42.5)


def test_the_report_gives_the_ode_and_the_sde_evaluation_of_each_finished_run(bench, tmp_path: Path) -> None:
    out, md = tmp_path / "runs", tmp_path / "docs" / "flow_model.md"
    md.parent.mkdir()
    _finished_run(out / "grpo", (0.656, 0.734), (0.719, 0.75))
    (out / "diffusion-nft" / "run").mkdir(parents=True)  # unfinished: left out
    bench.report(out, md, PROMPT)
    text = md.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| grpo |"))
    assert "0.656 → **0.734**" in row and "0.719 → **0.750**" in row and "| 42.5 |" in row and "| 0.7 |" in row
    assert "diffusion-nft" not in text and "on 64 images" in text
    kept = md.with_suffix("") / "data" / "grpo"
    assert (kept / "eval-tuned-ode_eval.json").is_file() and (kept / "run_metrics.jsonl").is_file()


def test_a_report_without_finished_runs_leaves_the_committed_one(bench, tmp_path: Path) -> None:
    md = tmp_path / "flow_model.md"
    md.write_text("kept")
    with pytest.raises(SystemExit, match="nothing to report"):
        bench.report(tmp_path / "none", md, PROMPT)
    assert md.read_text() == "kept"
