"""A tiny tuning sweep end to end: it runs (screening, confirmation, validation), resumes and writes
its report."""

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
                      validation_methods=["dpok"], confirm_top=1, confirm_prompts=["a green circle"],
                      confirm_seeds=[1], confirm_images=3)
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
    assert sweep.run("confirmation") == 3  # the base model and each method's one finalist, on 3 images
    confirmed = sweep.results("confirmation")
    assert {(r["method"], r["prompt"], r["seed"], r["eval_images"]) for r in confirmed} == {
        (m, "a green circle", 1, 3) for m in ("base", "dpok", "sft-kl")}
    assert sweep.run("confirmation") == 0  # finished, not repeated
    assert sweep.chosen() == {m: cands[0] for m, cands in sweep.finalists().items()}
    assert sweep.run("validation") == 1  # only the chosen dpok setting, on the one validation prompt
    report = write_report(sweep, tmp_path / "docs" / "tuning.md")
    text = report.read_text()
    assert "earlier trial(s)" not in text  # the base model's confirmation is no trial of unknown threads
    for needle in ("## dpok", "## sft-kl", "(chosen)", "References without training", "not tuned on", "a blue square",
                   "## Confirmation of the finalists", "`a green circle`, seed 1, the same 3 images"):
        assert needle in text, needle
    assert (tmp_path / "docs" / "tuning" / "curves.png").is_file()
    raw = tmp_path / "docs" / "tuning" / "data"
    assert len(list(raw.glob("*/*/*/*/seed*/result.json"))) == 4 + 4 + 3 + 1
    # the kept raw results are a sweep folder of their own: the report can be rebuilt from them
    kept = SweepConfig(output_dir=str(raw), prompts=cfg.prompts, methods=cfg.methods, confirm_top=cfg.confirm_top,
                       confirm_prompts=cfg.confirm_prompts, confirm_seeds=cfg.confirm_seeds)
    assert Sweep(kept).chosen() == sweep.chosen()



def test_a_trial_with_an_ema_is_judged_on_the_ema_weights(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import torch
    from safetensors.torch import load_file

    import dpok.tuning as tuning

    seen: list[float] = []
    real = tuning.evaluate_prompt

    def spy(adapter, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(float(sum(p.detach().double().pow(2).sum() for p in adapter.trainable_parameters())))
        return real(adapter, *args, **kwargs)

    monkeypatch.setattr(tuning, "evaluate_prompt", spy)
    tiny = {"num_steps": 3, "sample_batch_size": 4, "minibatch_size": 4, "gradient_steps": 2, "ema_decay": 0.5,
            "learning_rate": 1e-2}
    cfg = SweepConfig(output_dir=str(tmp_path / "sweep"), prompts=["a red circle"], rounds=2, samples_per_round=4,
                      eval_images=2, checkpoint_every=0, common=tiny, methods={"dpok": [Candidate("defaults")]})
    assert Sweep(cfg, log=lambda *_: None).run("trials") == 1
    run = tmp_path / "sweep" / "trials" / "dpok" / "defaults" / "a-red-circle" / "seed0" / "run"

    def squares(folder: str) -> float:
        tensors = load_file(str(run / folder / "pytorch_lora_weights.safetensors"))
        return float(sum(t.double().pow(2).sum() for t in tensors.values()))

    assert len(seen) == 1
    assert torch.isclose(torch.tensor(seen[0]), torch.tensor(squares("lora_ema")), rtol=1e-6)
    assert not torch.isclose(torch.tensor(seen[0]), torch.tensor(squares("lora")), rtol=1e-6)
