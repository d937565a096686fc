"""The GPU benchmark's scaled-down run on the CPU: every measure it reports comes out, for a DDPM-family
and a flow-matching configuration, and the report is written."""

from __future__ import annotations

import json
from pathlib import Path

from benchmark_scripts import load_benchmark


def _bench():  # noqa: ANN202
    return load_benchmark("gpu_bench")


def test_the_scaled_down_gpu_benchmark_reports_every_measure(tmp_path: Path) -> None:
    report = tmp_path / "gpu_bench.md"
    rows = _bench().main(["--scale", "tiny", "--device", "cpu", "--precision", "no", "--steps", "2", "--batch", "2",
                          "--rounds", "1", "--families", "sd15", "flux-dev", "--algorithms", "grpo",
                          "--report", str(report)])
    assert [(r["family"], r["algorithm"]) for r in rows] == [("sd15", "grpo"), ("flux-dev", "grpo")]
    for row in rows:
        # the round's denoiser calls: 2 sampling steps without gradient, and trained steps with it
        kinds = {(c["grad"], c["batch"]) for c in row["calls"]}
        assert (False, 2) in kinds and any(grad for grad, _ in kinds), row["calls"]
        assert all(c["calls"] > 0 and c["bare_s"] > 0 and c["flops"] > 0 for c in row["calls"])
        assert row["round_s"] > 0 and row["bare_s"] > 0 and row["tflops_per_s"] > 0
        assert row["samples_per_s"] == 2 / row["round_s"] and row["mfu"] is None  # no peak known for a CPU
    assert json.loads((tmp_path / "gpu_bench" / "data.json").read_text()) == json.loads(json.dumps(rows))
    assert "| sd15 | grpo | 2 |" in report.read_text() and "| flux-dev | grpo | 2 |" in report.read_text()
