"""benchmarks/default_run.py: its table of why images fail the judge, on hand-made evaluations."""

from __future__ import annotations

import json
from pathlib import Path

from tests.benchmark_scripts import load_benchmark


def _evaluation(folder: Path, name: str, prompt: str, **row: float) -> None:
    (folder / f"eval-{name}").mkdir(parents=True)
    result = {"splits": {"seen": {"prompts": {prompt: row}}}}
    (folder / f"eval-{name}" / "eval.json").write_text(json.dumps(result))


def test_the_report_says_why_images_fail_the_judge(tmp_path: Path) -> None:
    bench = load_benchmark("default_run")
    out = tmp_path / "default-run"
    (out / "run").mkdir(parents=True)
    (out / "run" / "config.json").write_text(json.dumps({"prompt": []}))  # the default prompt
    flaws = dict(judge_missing=0.3, judge_extra=0.05, judge_foreign=0.0, judge_unrecognised=0.1)
    _evaluation(out, "base", bench.PROMPT, judge_aligned=0.6, **flaws)
    _evaluation(out, "tuned", bench.PROMPT, judge_aligned=0.75, **{**flaws, "judge_missing": 0.02,
                                                                    "judge_extra": 0.2})
    lines = bench.flaw_table(out, [out])
    assert lines[0] == "## Why images fail the judge"
    base, tuned = (line for line in lines if line.startswith(f"| `{bench.PROMPT}`"))
    assert base.split(" | ")[1:] == ["base", "0.600", "0.300", "0.050", "0.000", "0.100 |"]
    assert tuned.split(" | ")[1:] == ["fine-tuned", "0.750", "0.020", "0.200", "0.000", "0.100 |"]
    # evaluations from before the judge named its flaws: no table
    old = tmp_path / "old"
    (old / "run").mkdir(parents=True)
    (old / "run" / "config.json").write_text(json.dumps({"prompt": ["four red squares"]}))
    for name in ("base", "tuned"):
        _evaluation(old, name, "four red squares", judge_aligned=0.2)
    assert bench.flaw_table(old, [old]) == []
