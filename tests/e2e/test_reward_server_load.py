"""Load test of the reward server (benchmarks/reward_server_load.py), loopback only, bounded in count and time."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark

ROOT = Path(__file__).resolve().parents[2]
MEMORY_BOUND_MIB = 128  # the limits allow ~1 MiB body + 16 decoded 64x64 images per request, 8 at a time


def _load_benchmark():  # noqa: ANN202
    return load_benchmark("reward_server_load")


def _check(result, load) -> None:  # noqa: ANN001
    assert result.ok, load.describe(result)
    assert set(result.answered) == set(load.EXPECTED), "every kind of request was sent and answered"
    assert sum(result.answered.values()) == result.total and result.lost == 0
    assert result.images_scored >= result.answered["good"]
    if result.peak_rss_mib is not None:  # Linux: the server's peak resident memory stayed bounded
        assert result.peak_rss_mib - result.rss_start_mib < MEMORY_BOUND_MIB, load.describe(result)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_concurrent_clients_good_and_bad_requests_bounded(tmp_path: Path) -> None:
    load = _load_benchmark()
    result = load.run_load_test(clients=8, requests=24, seed=1, time_limit_s=60, log_dir=tmp_path, pool_size=8, fork=True)
    _check(result, load)


@pytest.mark.slow
def test_full_load_against_the_cli_server(tmp_path: Path) -> None:
    load = _load_benchmark()
    result = load.run_load_test(clients=8, requests=250, seed=0, time_limit_s=600, log_dir=tmp_path)
    _check(result, load)
    assert result.total == 2000
