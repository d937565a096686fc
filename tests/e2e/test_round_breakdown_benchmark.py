"""benchmarks/round_breakdown.py end to end on the embedded model at toy size: the calls it records
per network and phase, both ratios, and the report it writes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from benchmark_scripts import load_benchmark


def test_the_breakdown_records_every_network_and_writes_both_ratios(tmp_path: Path) -> None:
    bench = load_benchmark("round_breakdown")
    threads = torch.get_num_threads()
    try:  # the script sets torch's threads for the process; later tests' rounding depends on them
        bench.main(["--algorithm", "ddpo-sf", "--algorithm", "rejection-sampling", "--samples", "2", "--steps", "2",
                    "--rounds", "1", "--report", str(tmp_path / "report.md"), "--data", str(tmp_path / "data.json"),
                    "--runs-dir", str(tmp_path / "runs")])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "data.json").read_text())
    assert list(data["algorithms"]) == ["ddpo-sf", "rejection-sampling"]
    for name, r in data["algorithms"].items():
        calls = r["network_calls_per_round"]
        # two guided steps of a batch of 2 (one UNet call of 4 each), one decode of the batch
        assert calls["sampling/unet/batch 4/fwd"] == 2 and calls["sampling/decode/batch 2/fwd"] == 1, name
        assert any(k.startswith("sampling/text/") for k in calls), name
        bare, networks = r["bare_unet_seconds"], r["bare_network_seconds"]
        assert networks["sampling"] > bare["sampling"] > 0  # the decode and text encoder add to the UNet
        assert networks["update"] == bare["update"]  # the update runs the UNet only
        assert r["ratio_to_networks"]["sampling"] < r["ratio_to_bare"]["sampling"]
        assert 0 < r["bare_decode_seconds"] < networks["sampling"] - bare["sampling"]  # the text encoder too
    assert any(k.startswith("update/unet/") and k.endswith("fwd+bwd")
               for k in data["algorithms"]["ddpo-sf"]["network_calls_per_round"])
    text = (tmp_path / "report.md").read_text()
    assert "| `ddpo-sf` |" in text and "| `rejection-sampling` |" in text and "all its networks" in text
