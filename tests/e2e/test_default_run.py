"""The default run learns: `dpok train` with no options, judged by the independent geometric judge.

Slow tier (about 10 minutes on a 2-core CPU): ``pytest -m slow tests/e2e/test_default_run.py``.
benchmarks/default_run.py measures the same run for docs/default_run.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

# the targets of the default run: the judge's aligned share at least 0.9, clean shapes 0.95, the
# 5-round mean training reward never more than 0.1 below its best
MIN_JUDGE = 0.9
MIN_CLEAN = 0.95
MAX_DROP = 0.1


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not reached yet: docs/default_run.md measured judge 0.641 -> 0.750, clean "
                   "0.969 on 64 images at 800 queries, training reward falling 0.146 below its best; strict, so a "
                   "run that reaches the targets fails here until this mark is removed")
def test_the_default_run_lifts_the_judge_and_keeps_learning(tmp_path: Path) -> None:
    from dpok.config import build_config
    from dpok.evaluate import SampleSettings, evaluate_prompt
    from dpok.rewards import make_reward
    from dpok.runlog import read_metrics
    from dpok.trainer import Trainer
    from dpok.tuning import largest_drop, smoothed

    torch.set_num_threads(2)
    trainer = Trainer(build_config(None, {"output_dir": str(tmp_path / "run")}))
    prompt = trainer.prompts[0]
    judge = make_reward("shapeworld-alignment", device=torch.device("cpu"))
    settings = SampleSettings(32, trainer.cfg.num_steps, trainer.cfg.guidance_scale, 1.0)
    with trainer.adapter.reference():
        before, _ = evaluate_prompt(trainer.adapter, judge, prompt, settings, 777, trainer.domain)
    trainer.run()
    after, _ = evaluate_prompt(trainer.adapter, judge, prompt, settings, 777, trainer.domain)
    rewards = [r["reward/mean"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert after["judge_aligned"] >= MIN_JUDGE and after["judge_aligned"] > before["judge_aligned"], (before, after)
    assert after["clean_share"] >= MIN_CLEAN, after
    assert largest_drop(smoothed(rewards)) <= MAX_DROP, rewards
