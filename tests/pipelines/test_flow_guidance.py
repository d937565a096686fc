"""benchmarks/flow_guidance.py: the flow model's judge-aligned share against the guidance scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("flow_guidance")


def _result(scale: float, common: float, rare: float) -> dict:
    cats = {c: {"aligned_by_judge": v, "aligned_by_reward": v, "prompts": 4}
            for c, v in (("common", common), ("rare", rare), ("count4", 0.1), ("heldout", 0.0))}
    return {"guidance_scale": scale, "per_category": cats, "images_per_prompt": 8, "steps": 28, "seed": 101,
            "seconds": 1.0, "cpu": {"model": "test CPU", "avx512": False}}


def test_the_best_scale_is_the_best_on_common_prompts_then_rare_then_the_lower(bench) -> None:
    results = [_result(5, 0.7, 0.9), _result(3, 0.8, 0.5), _result(2, 0.8, 0.6), _result(1.5, 0.8, 0.6)]
    assert bench.best_scale(results)["guidance_scale"] == 1.5
    assert bench.best_scale(results[:2])["guidance_scale"] == 3


def test_the_report_marks_the_best_scale(bench, tmp_path: Path) -> None:
    path = bench.write_report([_result(5, 0.7, 0.9), _result(3, 0.85, 0.5)], tmp_path)
    text = path.read_text()
    assert "| **3** | 85.0% (85.0%) | 50.0% (50.0%) |" in text and "| 5 | 70.0% (70.0%) |" in text
    assert "guidance **3**" in text and "test CPU, without AVX-512" in text


def test_a_short_sweep_measures_every_category_and_keeps_its_results(bench, tmp_path: Path) -> None:
    argv = ["--scales", "1,2", "--images", "1", "--steps", "2", "--docs", str(tmp_path)]
    assert bench.main(argv) == 0
    data = tmp_path / "flow_guidance" / "data"
    first = json.loads((data / "guidance_2.json").read_text())
    assert set(first["per_category"]) == {"common", "rare", "count4", "heldout"}
    assert all(0 <= c["aligned_by_judge"] <= 1 for c in first["per_category"].values())
    assert first["per_category"]["common"]["prompts"] == sum(p["category"] == "common"
                                                             for p in first["per_prompt"].values())
    assert first["seed"] == 101 and first["cpu"]["model"]
    stamp = (data / "guidance_2.json").stat().st_mtime_ns
    assert bench.main(argv) == 0  # kept results are not measured again
    assert (data / "guidance_2.json").stat().st_mtime_ns == stamp
    assert "| 1 |" in (tmp_path / "flow_guidance.md").read_text() or "| **1** |" in (
        tmp_path / "flow_guidance.md").read_text()


@pytest.mark.parametrize("scales", ["0.5,2", "two", ""])
def test_bad_scales_are_refused_by_name(bench, tmp_path: Path, scales: str, capsys) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--scales", scales, "--docs", str(tmp_path)])
    assert "--scales" in capsys.readouterr().err
