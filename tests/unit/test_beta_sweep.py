"""benchmarks/beta_sweep.py: which earlier trials count as a beta's, and the choice rule, on
hand-made results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("beta_sweep")


def _result(bench, beta: float, prompt: str, seed: int, judge: float, *, images: int = 256,
            name: str = "", method: str = "dpok") -> dict:
    overrides = {} if method != "dpok" else dict(bench.settings(beta))
    return {"method": method, "candidate": name or f"beta{beta:g}", "overrides": overrides, "prompt": prompt,
            "seed": seed, "eval_images": images, "machine": "test CPU", "seconds_per_round": 8.0,
            "smoothed_drop": 0.0, "train_s": 1.0, "queries": 800, "curve": {"reward": [0.5], "kl": [0.0]},
            "eval": {"judge_aligned": judge, "clean_share": 1.0, "reward_mean": judge, "kl_to_base": 100.0 / (beta + 1)}}


def _write(root: Path, method: str, name: str, prompt: str, seed: int, result: dict) -> None:
    folder = root / "explore" / method / name / prompt.replace(" ", "-") / f"seed{seed}"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(result))


def test_the_default_beta_written_out_is_the_same_trial_as_left_out(bench) -> None:
    written = _result(bench, 0.01, "p", 0, 0.5)
    written["overrides"] = {**written["overrides"], "beta": 0.01}
    assert bench.same(written, bench.settings(0.01), "p", 0, 256)
    assert not bench.same(written, bench.settings(1.0), "p", 0, 256)


def test_another_seed_prompt_image_count_or_setting_is_another_trial(bench) -> None:
    r = _result(bench, 1.0, "p", 0, 0.5)
    assert bench.same(r, bench.settings(1.0), "p", 0, 256)
    assert not bench.same(r, bench.settings(1.0), "p", 1, 256)
    assert not bench.same(r, bench.settings(1.0), "q", 0, 256)
    assert not bench.same(r, bench.settings(1.0), "p", 0, 32)
    changed = {**r, "overrides": {**r["overrides"], "learning_rate": 0.002}}
    assert not bench.same(changed, bench.settings(1.0), "p", 0, 256)


def test_the_choice_counts_only_pairs_every_beta_finished(bench, tmp_path: Path) -> None:
    out = tmp_path / "tuning"
    # on pair (a, 0) beta 1 wins; beta 3 wins (a, 1) by far, but beta 1 never ran it: it must not count
    for beta, seed, judge in [(0.01, 0, 0.5), (1.0, 0, 0.8), (3.0, 0, 0.6), (0.01, 1, 0.4), (3.0, 1, 1.0)]:
        _write(out, "dpok", f"beta{beta:g}", "a", seed, _result(bench, beta, "a", seed, judge))
    _write(out, "base", "none-256images", "a", 0, _result(bench, 0, "a", 0, 0.7, method="base"))
    args = bench.parse(["--output-dir", str(out), "--report", str(tmp_path / "beta.md"), "--betas", "0.01", "1", "3",
                        "--prompts", "a", "--seeds", "0", "1"])
    text, chosen = bench.report(bench.BetaSweep(args))
    assert chosen == 1.0
    assert "1 of 2 so far" in text
    # the worst prompt's change against the base: beta 1 on `a` seed 0 is 0.8 - 0.7
    assert "| 1 | 0.800 | +0.100 |" in text
    assert "| `a` | 0.700 | – | 0.450 (0.500, 0.400) |" in text
    assert (tmp_path / "beta" / "judge_vs_beta.png").is_file()
    # against the default on every pair both finished: beta 3 on both seeds (+0.1, +0.6), beta 1 on one
    assert "| 3 | 2 | 0.800 | 0.450 | +0.350 | 0.250 | 2 of 2 |" in text
    assert "| 1 | 1 | 0.800 | 0.500 | +0.300 | – | 1 of 1 |" in text


def test_no_choice_before_any_pair_is_complete(bench, tmp_path: Path) -> None:
    out = tmp_path / "tuning"
    _write(out, "dpok", "beta1", "a", 0, _result(bench, 1.0, "a", 0, 0.9))
    args = bench.parse(["--output-dir", str(out), "--report", str(tmp_path / "beta.md"), "--betas", "0.01", "1",
                        "--prompts", "a", "--seeds", "0"])
    text, chosen = bench.report(bench.BetaSweep(args))
    assert chosen is None
    assert "no choice" in text


def test_bad_arguments_are_refused_by_name(bench) -> None:
    with pytest.raises(SystemExit):
        bench.parse(["--betas", "-1"])
    with pytest.raises(SystemExit):
        bench.parse(["--eval-images", "0"])


def test_keeping_a_result_rewrites_the_tuning_report_with_its_exploration_row(bench, tmp_path: Path) -> None:
    out = tmp_path / "tuning"
    _write(out, "dpok", "beta3", "a", 0, _result(bench, 3.0, "a", 0, 0.625))
    report = tmp_path / "tuning.md"
    args = bench.parse(["--output-dir", str(out), "--tuning-report", str(report)])
    bench.BetaSweep(args).keep()
    text = report.read_text()
    assert "| dpok | beta3 | a | 0 |" in text and "0.625" in text
    assert (tmp_path / "tuning" / "data" / "explore" / "dpok" / "beta3" / "a" / "seed0" / "result.json").is_file()
