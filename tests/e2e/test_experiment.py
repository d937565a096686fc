"""A tiny paper experiment end to end: units, resume, the over-optimisation study and the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpok.experiment import Experiment, ExperimentConfig, load_results
from dpok.report import write_report
from dpok.rewards.config import RewardConfig


def tiny_config(out: Path) -> ExperimentConfig:
    return ExperimentConfig(
        output_dir=str(out), tasks=["multi"], methods=["base", "dpok"], seeds=[0], rounds=2, samples_per_round=4,
        num_steps=3, eval_images=2, multi_eval_images=1, checkpoint_every=1, overopt_rounds=1, overopt_eval_every=1,
        overopt_eval_images=2, train_overrides={"sample_batch_size": 4, "minibatch_size": 4, "gradient_steps": 1},
    )


@pytest.mark.slow  # in the default suite: units of the experiment and their resume (the tests below)
def test_tiny_paper_experiment_runs_resumes_and_writes_the_report(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "out")
    exp = Experiment(cfg, log=lambda m: None)
    assert exp.run() == 4  # 1 task x 2 methods + 2 over-optimisation runs
    assert exp.finished()
    meta, units, overopt = load_results(cfg.output_dir)
    assert meta["budget"] == 8 and len(units) == 2
    dpok_unit = next(u for u in units if u["task"] == "multi" and u["method"] == "dpok")
    assert dpok_unit["train_queries"] == 8 and [c["queries"] for c in dpok_unit["curve"]] == [4, 8]
    assert dpok_unit["splits"]["seen"]["kl_to_base_mean"] > 0
    base_multi = next(u for u in units if u["task"] == "multi" and u["method"] == "base")
    assert set(base_multi["splits"]) == {"seen", "unseen"} and base_multi["splits"]["unseen"]["kl_to_base_mean"] == 0
    assert sorted(overopt) == ["0", "0.01"] and [p["round"] for p in overopt["0"]] == [0, 1]

    # a second run has nothing to do; a lost result is recomputed, and only it
    assert Experiment(cfg, log=lambda m: None).run() == 0
    (tmp_path / "out" / "units" / "multi" / "base" / "seed0" / "result.json").unlink()
    assert Experiment(cfg, log=lambda m: None).run() == 1

    report = write_report(cfg.output_dir, tmp_path / "docs" / "results.md")
    text = report.read_text()
    for needle in ("multi-prompt", "unseen prompts", "reward_vs_queries.png", "Over-optimisation study",
                   "Reading: the four claims", "(4) Fine-tuning on some prompts"):
        assert needle in text, needle
    # every figure the report links to exists
    for line in text.splitlines():
        if line.startswith("!["):
            assert (report.parent / line.split("(")[1].rstrip(")")).is_file(), line


def test_an_interrupted_unit_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "out")
    cfg.tasks, cfg.methods, cfg.overopt_rounds, cfg.rounds = ["count"], ["dpok"], 0, 3
    exp = Experiment(cfg, log=lambda m: None)
    task, method = exp.tasks["count"], exp.methods["dpok"]
    run_dir = exp.unit_dir("count", "dpok", 0) / "run"
    # a unit killed after its round-2 checkpoint: the next attempt resumes it instead of starting over
    from dpok.trainer import Trainer

    Trainer(exp.train_config(task, method, 0, run_dir, rounds=2)).run()
    cfg2 = exp.train_config(task, method, 0, run_dir, rounds=3)
    assert cfg2.resume == str(run_dir)
    result = exp.run_unit(task, method, 0)
    assert [c["queries"] for c in result["curve"]] == [4, 8, 12]






def test_your_own_model_and_prompts(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    """The experiment on another model with a reward that needs no weights and the user's own
    seen / unseen prompts: one task named 'custom'; the report names the model."""
    cfg = ExperimentConfig(output_dir=str(tmp_path / "out"), model=str(tiny_pipeline_dir),
                           reward=RewardConfig("jpeg-compressibility"),
                           methods=["base", "ddpo-is"], seeds=[0], rounds=1, samples_per_round=2, num_steps=2,
                           eval_images=2, multi_eval_images=2, overopt_rounds=0, device="cpu",
                           custom_seen=["a photo of a cat"], custom_unseen=["a photo of a dog"],
                           train_overrides={"stat_min_count": 1, "stat_buffer": 2})
    Experiment(cfg, log=lambda m: None).run()
    _, units, _ = load_results(cfg.output_dir)
    assert {u["task"] for u in units} == {"custom"} and len(units) == 2
    unit = next(u for u in units if u["method"] == "ddpo-is")
    assert set(unit["splits"]) == {"seen", "unseen"} and "judge_aligned_mean" not in unit["splits"]["seen"]
    text = write_report(cfg.output_dir, tmp_path / "results.md").read_text()
    assert str(tiny_pipeline_dir) in text and "custom prompts" in text
    # another experiment's report keeps its figures in a folder of its own name and names its kept results
    text = write_report(cfg.output_dir, tmp_path / "results_1k.md", raw_dir="docs/results_1k/data",
                        report_path="docs/results_1k.md").read_text()
    assert "--output-dir docs/results_1k/data --report docs/results_1k.md" in text
    assert (tmp_path / "results_1k" / "reward_vs_queries.png").is_file()


def test_the_newer_methods_run_as_units_of_the_experiment(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "out")
    cfg.tasks, cfg.methods, cfg.overopt_rounds = ["color"], ["grpo", "diffusion-nft"], 0  # one prompt: quick
    cfg.train_overrides = {"sample_batch_size": 4, "gradient_steps": 1}
    exp = Experiment(cfg, log=lambda m: None)
    exp.run()
    _, units, _ = load_results(cfg.output_dir)
    assert sorted(u["method"] for u in units) == ["diffusion-nft", "grpo"]
    assert all(u["train_queries"] == 8 for u in units)

    # a report rewritten from results without their images (the raw data kept in the repository)
    # keeps the sample grid drawn earlier from the same units, and draws none where there is none
    import shutil

    report = tmp_path / "docs" / "results.md"
    assert "grid_color_seen.png" in write_report(cfg.output_dir, report).read_text()
    for images in (tmp_path / "out" / "units").glob("*/*/*/images"):
        shutil.rmtree(images)
    assert "grid_color_seen.png" in write_report(cfg.output_dir, report).read_text()
    (tmp_path / "docs" / "results" / "grid_color_seen.png").unlink()
    assert "grid_color_seen.png" not in write_report(cfg.output_dir, report).read_text()
