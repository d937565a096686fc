"""benchmarks/denoiser_speed.py end to end on a tiny random pipeline: every option but compile (slow tier)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from benchmark_scripts import load_benchmark


def test_the_benchmark_times_each_option_checks_its_ratio_and_writes_its_report(
        tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    bench = load_benchmark("denoiser_speed")
    options = ["stock", "channels-last", "bf16", "channels-last+bf16"]
    threads = torch.get_num_threads()
    try:  # the script sets torch's threads for the process; later tests' rounding depends on them
        bench.main(["--models", str(tiny_pipeline_dir), "--options", *options, "--batch", "2", "--repeats", "2",
                    "--calls", "1", "--threads", "1", "--data-dir", str(tmp_path / "data"),
                    "--report", str(tmp_path / "report.md")])
    finally:
        torch.set_num_threads(threads)
    (raw,) = (tmp_path / "data").glob("*.json")
    rows = json.loads(raw.read_text())["models"][str(tiny_pipeline_dir)]
    assert list(rows) == options
    assert rows["stock"]["relative_error"] == 0 and rows["stock"]["max_ratio_error"] < 1e-4
    assert rows["channels-last"]["relative_error"] < 1e-4
    assert 0 < rows["bf16"]["relative_error"] < 0.1
    assert all(len(r["raw"]["sample"]) == 2 and r["update_s"] > 0 for r in rows.values())
    text = (tmp_path / "report.md").read_text()
    assert "| bf16 |" in text and "AVX-512" in text
