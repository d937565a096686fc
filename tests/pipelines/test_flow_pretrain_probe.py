"""benchmarks/flow_pretrain_probe.py: short equal-time probes of flow-transformer settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("flow_pretrain_probe")


def test_a_probe_without_a_latent_pool_says_how_to_make_one(bench, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no latent pool.*--max-steps-per-run 1"):
        bench.main(["--work-dir", str(tmp_path / "work"), "--name", "x", "--docs", str(tmp_path)])


def test_a_tiny_probe_trains_validates_and_writes_its_report(bench, tmp_path: Path) -> None:
    import torch

    from dpok.embedded.pretrain_config import PretrainConfig
    from dpok.embedded.pretrain_flow import load_components
    from dpok.embedded.stages import Context, encode_latent_pool

    work = tmp_path / "work"
    ctx = Context(PretrainConfig(family="flow-matching", work_dir=str(work), latent_pool=24))
    parts = load_components(ctx)
    encode_latent_pool(ctx, "transformer", parts["vae"], parts["tokenizer"])
    threads = torch.get_num_threads()
    argv = ["--work-dir", str(work), "--name", "tiny", "--width", "16", "--layers", "1", "--minutes", "0.002",
            "--judge-prompts", "1", "--docs", str(tmp_path)]
    assert bench.main(argv) == 0
    assert torch.get_num_threads() == threads  # the tests after this one keep their thread setting
    result = json.loads((tmp_path / "flow_pretrain_probe" / "data" / "tiny.json").read_text())
    assert result["steps"] >= 1 and result["curve"][-1]["step"] == result["steps"]
    last = result["curve"][-1]
    assert last["val"] > 0 and all(last[f"val_t{t}"] > 0 for t in (0.1, 0.3, 0.5, 0.7, 0.9))
    assert 0 <= result["judge_common"] <= 1 and result["settings"]["width"] == 16 and result["cpu"]["model"]
    report = (tmp_path / "flow_pretrain_probe.md").read_text()
    assert "| tiny | 16 | 1 | 2 |" in report
    with pytest.raises(SystemExit):  # 4 attention heads need a width divisible by 4
        bench.main([*argv, "--width", "18"])
