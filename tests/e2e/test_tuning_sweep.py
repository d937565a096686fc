"""A tiny tuning sweep end to end: it runs, resumes and writes its report."""

from __future__ import annotations

import json
from pathlib import Path

from dpok.tuning import Candidate, Sweep, SweepConfig


def test_a_tiny_sweep_runs_resumes_and_reports(tmp_path: Path) -> None:
    from dpok.report_tuning import write_report

    tiny = {"num_steps": 3, "sample_batch_size": 4, "minibatch_size": 4, "gradient_steps": 1}
    cfg = SweepConfig(output_dir=str(tmp_path / "sweep"), prompts=["a red circle"], validation_prompts=["a blue square"],
                      rounds=2, samples_per_round=4, eval_images=2, checkpoint_every=1, common=tiny,
                      methods={"dpok": [Candidate("defaults"), Candidate("clip", (("clip_range", 1e-2),))],
                               "sft-kl": [Candidate("defaults"), Candidate("gamma", (("gamma", 0.1),))]},
                      validation_methods=["dpok"])
    logs: list[str] = []
    sweep = Sweep(cfg, log=logs.append)
    assert sweep.run("trials") == 4
    assert sweep.run("trials") == 0  # finished trials are not repeated
    rows = sweep.results("trials")
    assert {(r["method"], r["candidate"]) for r in rows} == {("dpok", "defaults"), ("dpok", "clip"),
                                                             ("sft-kl", "defaults"), ("sft-kl", "gamma")}
    for r in rows:
        assert r["queries"] == 8 and len(r["curve"]["reward"]) == 2
        assert 0 <= r["eval"]["judge_aligned"] <= 1 and r["smoothed_drop"] >= 0
    assert all(json.loads((tmp_path / "sweep" / "trials" / m / c / "a-red-circle" / "seed0" / "run" / "config.json")
                          .read_text())["num_steps"] == 3 for m, c in (("dpok", "clip"), ("sft-kl", "gamma")))
    assert sweep.run("references") == 4  # base and best-of-8 on both prompts
    assert sweep.run("validation") == 1  # only the chosen dpok setting, on the one validation prompt
    report = write_report(sweep, tmp_path / "docs" / "tuning.md")
    text = report.read_text()
    for needle in ("## dpok", "## sft-kl", "(chosen)", "References without training", "not tuned on", "a blue square"):
        assert needle in text, needle
    assert (tmp_path / "docs" / "tuning" / "curves.png").is_file()
    raw = tmp_path / "docs" / "tuning" / "data"
    assert len(list(raw.glob("*/*/*/*/seed*/result.json"))) == 4 + 4 + 1
    # the kept raw results are a sweep folder of their own: the report can be rebuilt from them
    assert Sweep(SweepConfig(output_dir=str(raw), prompts=cfg.prompts, methods=cfg.methods)).chosen() == sweep.chosen()

