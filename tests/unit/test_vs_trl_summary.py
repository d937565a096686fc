"""benchmarks/vs_trl.py: the summary and report of its runs, on hand-made run records."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark


def _run(tool: str, repeat: int, train_s: float, process_s: float) -> dict:
    return {"tool": tool, "repeat": repeat, "train_s": train_s, "process_s": process_s, "samples": 48}


@pytest.fixture(scope="module")
def vs_trl():
    return load_benchmark("vs_trl")


def test_summary_ratios_and_the_variants_cold_first_repeat(vs_trl) -> None:
    runs = [_run("trl", r, 24.0, 30.0) for r in range(3)]
    runs += [_run("dpok", r, s, 40.0) for r, s in enumerate((20.0, 16.0, 12.0))]
    # the compiling variant: its first repeat pays the compilation
    runs += [_run("dpok+compile", r, s, p) for r, (s, p) in enumerate(((48.0, 60.0), (12.0, 20.0), (16.0, 24.0)))]
    s = vs_trl.summarise(runs)
    assert s["trl"]["train"] == pytest.approx(2.0)
    assert s["dpok"]["train"] == pytest.approx(3.0)  # median of 2.4, 3, 4
    assert s["ratio"]["train"] == pytest.approx(1.5)
    assert s["ratio"]["process"] == pytest.approx(1.2 / 1.6)
    assert s["dpok+compile"]["train"] == pytest.approx(3.0)  # median of 1, 4, 3
    assert s["ratio:dpok+compile"]["train"] == pytest.approx(1.5)
    assert s["first:dpok+compile"]["train"] == pytest.approx(1.0)  # repeat 0, however the runs are ordered
    assert "first:dpok" not in s


def test_report_lists_each_variant_with_its_first_repeat(vs_trl, tmp_path: Path) -> None:
    runs = [_run("trl", 0, 24.0, 30.0), _run("dpok", 0, 16.0, 40.0), _run("dpok+compile", 0, 48.0, 60.0)]
    settings = {"repeats": 1, "rounds": 3, "samples": 16, "prompt": "two white triangles", "batch": 8, "steps": 20,
                "guidance": 5.0, "eval_images": 4}
    data = {"cpu": "a CPU", "threads": 2, "torch": "2", "settings": settings, "summary": vs_trl.summarise(runs)}
    vs_trl.write_report(data, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "| training phases (sample, reward, update) | 2.000 | 3.000 | 1.50x |" in text
    assert "| `--compile` | 1.000 | 0.50x | 0.50x |" in text
    # stock only: no variant section
    data["summary"] = vs_trl.summarise(runs[:2])
    vs_trl.write_report(data, tmp_path / "s.md")
    assert "speed option" not in (tmp_path / "s.md").read_text()
