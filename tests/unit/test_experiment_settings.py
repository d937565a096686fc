"""Paper experiment bookkeeping without training: worker claims and checked settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpok.experiment import ExperimentConfig, claim, load_results, release
from dpok.options import to_options


def tiny_config(out: Path) -> ExperimentConfig:
    return ExperimentConfig(
        output_dir=str(out), tasks=["multi"], methods=["base", "dpok"], seeds=[0], rounds=2, samples_per_round=4,
        num_steps=3, eval_images=2, multi_eval_images=1, checkpoint_every=1, overopt_rounds=1, overopt_eval_every=1,
        overopt_eval_images=2, train_overrides={"sample_batch_size": 4, "minibatch_size": 4, "gradient_steps": 1},
    )


def test_claims_exclude_live_workers_and_take_over_dead_ones(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    assert claim(folder)
    assert not claim(folder)  # held by this (live) process
    release(folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (folder / ".claim").write_text(dead.stdout.strip())  # a worker that was killed
    assert claim(folder) and (folder / ".claim").read_text() == str(os.getpid())


def test_bad_experiment_settings_are_named(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    cfg.methods, cfg.rounds = ["dpok", "ppo"], 0
    with pytest.raises(ValueError, match=r"unknown method 'ppo'.*\n.*rounds must be >= 1"):
        cfg.validate()
    with pytest.raises(FileNotFoundError, match="experiment.json"):
        load_results(tmp_path / "nothing")
    json.dumps(to_options(tiny_config(tmp_path)))  # the config is plain data (written to experiment.json)



def test_the_over_optimisation_runs_hold_a_constant_step(tmp_path: Path) -> None:
    # the study trains in segments, each resuming with more rounds: under the default cosine decay
    # the step fell to 0 at the end of every segment and jumped back at the next one
    from dpok.config import TrainConfig
    from dpok.experiment import Experiment

    cfg = tiny_config(tmp_path)
    cfg.overopt_learning_rate = 7e-4
    exp = Experiment(cfg, log=lambda m: None)
    assert TrainConfig().lr_schedule != "constant"
    for rounds in (15, 30):
        train = exp.overopt_config(0.01, rounds)
        assert (train.lr_schedule, train.learning_rate, train.rounds) == ("constant", 7e-4, rounds)
        assert train.policy_gradient.beta == 0.01


def test_the_kept_raw_results_are_the_json_of_the_experiment_only(tmp_path: Path) -> None:
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("paper_experiment")
    out, raw = tmp_path / "out", tmp_path / "raw"
    files = {"experiment.json": "{}", "units/color/dpok/seed0/result.json": "{}",
             "units/color/dpok/seed0/images/seen_00.png": "png", "units/color/dpok/seed0/run/metrics.jsonl": "",
             "overopt/beta0.01/points.jsonl": "{}", "overopt/beta0.01/images/round0000.png": "png"}
    for name, text in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    (raw / "units" / "gone" / "base" / "seed0").mkdir(parents=True)  # a unit of an earlier experiment
    assert bench.keep_raw(out, raw) == 3
    kept = sorted(str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file())
    assert kept == ["experiment.json", "overopt/beta0.01/points.jsonl", "units/color/dpok/seed0/result.json"]


def test_the_over_optimisation_reading_calls_a_fall_within_the_noise_of_its_images_noise() -> None:
    from dpok.report import overopt_reading, share_difference_noise

    def point(rnd: int, reward: float, judge: float) -> dict:
        return {"round": rnd, "queries": 32 * rnd, "reward_mean": reward, "judge_aligned": judge, "frechet": 0.4,
                "clean_share": 0.9, "kl_to_base": 10.0 * rnd}

    # one image of 32 fewer at the end while the reward creeps up: noise, not a trend
    small = overopt_reading({"0.01": [point(0, 0.5, 0.5), point(30, 0.756, 0.75), point(60, 0.774, 0.719)]}, 32)
    assert any("within the noise of 32 images" in line for line in small)
    assert not any("Over-optimisation is visible" in line for line in small)
    # the judge halves while the reward rises: a trend
    large = overopt_reading({"0": [point(0, 0.5, 0.5), point(30, 0.8, 0.8), point(60, 0.95, 0.3)]}, 32)
    assert any("Over-optimisation is visible" in line for line in large)
    # two standard errors of a difference of shares on n images each
    assert abs(share_difference_noise(0.5, 0.5, 32) - 2 * (0.5 / 32) ** 0.5) < 1e-12


def test_a_fresh_output_folder_continues_from_kept_results_of_the_same_experiment_only(tmp_path: Path) -> None:
    import json

    from benchmark_scripts import load_benchmark

    from dpok.experiment import ExperimentConfig
    from dpok.options import to_options

    bench = load_benchmark("paper_experiment")
    cfg = ExperimentConfig(output_dir=str(tmp_path / "out"), rounds=32, samples_per_round=32)
    raw = tmp_path / "raw"
    assert bench.same_settings(raw, cfg)  # nothing kept yet: any experiment may keep its results there
    unit = raw / "units" / "color" / "dpok" / "seed0" / "result.json"
    unit.parent.mkdir(parents=True)
    unit.write_text("{}")
    (raw / "overopt" / "beta0").mkdir(parents=True)
    (raw / "overopt" / "beta0" / "points.jsonl").write_text('{"round": 0}\n')
    meta = {"config": {**to_options(cfg), "output_dir": "elsewhere"}, "budget": cfg.budget}
    (raw / "experiment.json").write_text(json.dumps(meta))
    assert bench.same_settings(raw, cfg)

    out = Path(cfg.output_dir)
    assert bench.seed_from_kept(out, raw, cfg) == 2
    assert (out / "units" / "color" / "dpok" / "seed0" / "result.json").is_file()
    assert (out / "overopt" / "beta0" / "points.jsonl").read_text() == '{"round": 0}\n'
    (out / "experiment.json").write_text("{}")
    assert bench.seed_from_kept(out, raw, cfg) == 0  # a folder with results of its own is left alone

    other = ExperimentConfig(output_dir=str(tmp_path / "other"), rounds=16, samples_per_round=16)
    assert not bench.same_settings(raw, other)
    # where units may be copied from does not change what they are
    assert bench.same_settings(raw, ExperimentConfig(rounds=32, samples_per_round=32, reuse_units_from="elsewhere"))
    # results kept before method_settings existed were trained with the package defaults
    older = {k: v for k, v in meta["config"].items() if k not in ("method_settings", "tuning_dir")}
    (raw / "experiment.json").write_text(json.dumps({**meta, "config": older}))
    assert bench.same_settings(raw, cfg)
    assert not bench.same_settings(raw, ExperimentConfig(rounds=32, samples_per_round=32, method_settings="tuned"))
    (raw / "experiment.json").write_text(json.dumps(meta))
    assert bench.seed_from_kept(Path(other.output_dir), raw, other) == 0
    assert not Path(other.output_dir).exists()


def test_tuned_method_settings_are_the_sweeps_chosen_trials(tmp_path: Path) -> None:
    """Each method trains as the tuning sweep's trial of its chosen candidate did (the sweep's frozen base
    plus the candidate's overrides); the method's own defining overrides (DPOK's beta 0) on top."""
    from dpok.config import TrainConfig
    from dpok.experiment import Experiment
    from dpok.tuning import RUN_SETTINGS, load_sweep, tuned_settings

    tuned = tuned_settings("docs/tuning/data")
    sweep = load_sweep("docs/tuning/data")
    base = sweep.base()
    assert base["learning_rate"] != TrainConfig().learning_rate  # the frozen base is not today's defaults
    for method, cand in sweep.chosen().items():
        name, settings = tuned[method]
        overrides = dict(cand.overrides)
        assert name == cand.name and not RUN_SETTINGS & set(settings)
        assert settings == {k: overrides.get(k, base[k]) for k in TrainConfig().to_dict() if k not in RUN_SETTINGS}
    assert tuned["rwr"][1]["learning_rate"] == base["learning_rate"]  # RWR's chosen candidate changes its temperature only

    cfg = tiny_config(tmp_path / "tuned")
    cfg.methods, cfg.method_settings, cfg.tuning_dir = ["rwr", "dpok"], "tuned", "docs/tuning/data"
    cfg.train_overrides = {}
    exp = Experiment(cfg, log=lambda m: None)
    rwr = exp.method_settings(exp.methods["rwr"])
    assert rwr == tuned["rwr"][1] and rwr["rwr_temperature"] == tuned["rwr"][1]["rwr_temperature"]
    from dpok.experiment import Method

    no_kl = exp.method_settings(Method("dpok-no-kl", "", "dpok", (("beta", 0.0),)))
    assert no_kl == {**tuned["dpok"][1], "beta": 0.0}
    exp.write_meta()
    cfg2 = tiny_config(tmp_path / "tuned")  # the same folder, the package defaults: refused, nothing lost
    with pytest.raises(ValueError, match="method_settings 'tuned'"):
        Experiment(cfg2, log=lambda m: None).write_meta()
    with pytest.raises(FileNotFoundError, match="no tuning sweep"):
        Experiment(ExperimentConfig(output_dir=str(tmp_path / "x"), method_settings="tuned",
                                    tuning_dir=str(tmp_path / "none")), log=lambda m: None)


def test_the_report_says_how_the_methods_were_set() -> None:
    from dpok.report import _settings_note

    assert "package default" in _settings_note({}, [])  # results kept before method_settings existed
    units = [{"method": "rwr", "tuned_candidate": "temp0.05"}, {"method": "base"}, {"method": "dpok",
                                                                                    "tuned_candidate": "cosine"}]
    note = _settings_note({"method_settings": "tuned"}, units)
    assert "tuning sweep chose" in note and note.endswith("dpok `cosine`, rwr `temp0.05`.")
    units[2].update(task="color", seed=0, reused_from={"experiment": "runs/paper_experiment_1k",
                                                       "method_settings": "defaults"})
    note = _settings_note({"method_settings": "tuned"}, units)
    assert note.endswith("1 unit(s) ran with exactly these settings in the experiment of `runs/paper_experiment_1k` "
                         "and were copied from it, not trained again (dpok).")


def test_the_sample_efficiency_benchmark_takes_the_tuned_settings_into_its_own_folders(tmp_path: Path) -> None:
    from benchmark_scripts import load_benchmark

    from dpok.tuning import tuned_settings

    bench = load_benchmark("sample_efficiency")
    plain = bench.parse(["--output-dir", str(tmp_path / "a")])
    tuned = bench.parse(["--method-settings", "tuned", "--output-dir", str(tmp_path / "b")])
    assert bench.parse(["--method-settings", "tuned"]).report.endswith("sample_efficiency_tuned.md")
    assert bench.parse([]).report.endswith("sample_efficiency.md")
    chosen = tuned_settings("docs/tuning/data")["ddpo-is"][1]
    cfg_plain = bench.unit_config(plain, "color", "ddpo-is", 0)[0]
    cfg_tuned = bench.unit_config(tuned, "color", "ddpo-is", 0)[0]
    assert cfg_tuned.learning_rate == chosen["learning_rate"] != cfg_plain.learning_rate
    assert cfg_tuned.lora_rank == chosen["lora_rank"] and cfg_tuned.rounds == cfg_plain.rounds


def test_units_that_ran_with_the_same_settings_are_copied_not_trained_again(tmp_path: Path) -> None:
    """``reuse_units_from``: a unit is taken from another experiment only when its recorded training
    settings, task, seed and evaluation are this unit's; anything else is trained here."""
    from dpok.config import build_config
    from dpok.experiment import Experiment, Method

    source_cfg = tiny_config(tmp_path / "source")
    source_cfg.methods = ["base", "dpok", "dpok-no-kl", "rwr", "ddpo-is"]
    source = Experiment(source_cfg, log=lambda m: None)
    source.write_meta()
    task = source.tasks["multi"]
    for name in source_cfg.methods:
        folder = source.unit_dir("multi", name, 0)
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "seen_00.png").write_bytes(b"png")
        method = source.methods[name]
        if method.trains:  # what the trainer records in its run folder
            cfg = build_config(None, source.train_settings(task, method, 0, folder / "run", source_cfg.rounds))
            (folder / "run").mkdir()
            (folder / "run" / "config.json").write_text(json.dumps(cfg.to_dict()))
        (folder / "result.json").write_text(json.dumps({"task": "multi", "method": name, "seed": 0, "wall_s": 1.0,
                                                        "splits": {"seen": {"reward_mean": 0.5}}}))
    # rwr's recorded run differs from what this experiment would train (another temperature)
    rwr_run = source.unit_dir("multi", "rwr", 0) / "run" / "config.json"
    rwr_run.write_text(json.dumps({**json.loads(rwr_run.read_text()), "rwr_temperature": 0.7}))
    # a run recorded before a setting existed ran with that setting's old meaning (as on resume)
    no_kl_run = source.unit_dir("multi", "dpok-no-kl", 0) / "run" / "config.json"
    no_kl_run.write_text(json.dumps({k: v for k, v in json.loads(no_kl_run.read_text()).items()
                                     if k != "rollout_solver"}))

    # DDPO's own settings change a DDPO run, not a DPOK run
    for name in ("dpok", "ddpo-is"):
        run = source.unit_dir("multi", name, 0) / "run" / "config.json"
        run.write_text(json.dumps({**json.loads(run.read_text()), "timestep_fraction": 0.3}))

    cfg = tiny_config(tmp_path / "here")
    cfg.methods, cfg.reuse_units_from = source_cfg.methods, str(tmp_path / "source")
    exp = Experiment(cfg, log=lambda m: None)
    m = exp.methods
    assert exp.reusable_unit(task, m["base"], 0) == source.unit_dir("multi", "base", 0)
    assert exp.reusable_unit(task, m["dpok"], 0) == source.unit_dir("multi", "dpok", 0)
    assert exp.reusable_unit(task, m["dpok-no-kl"], 0) == source.unit_dir("multi", "dpok-no-kl", 0)
    assert exp.reusable_unit(task, m["rwr"], 0) is None
    assert exp.reusable_unit(task, m["ddpo-is"], 0) is None
    assert exp.reusable_unit(task, m["dpok"], 1) is None  # no such unit there
    assert exp.reusable_unit(task, Method("dpok", "", "dpok", (("beta", 0.5),)), 0) is None

    result = exp.reuse_unit(task, m["dpok"], 0, source.unit_dir("multi", "dpok", 0))
    copied = json.loads((exp.unit_dir("multi", "dpok", 0) / "result.json").read_text())
    assert copied == result and copied["reused_from"]["method_settings"] == "defaults"
    assert (exp.unit_dir("multi", "dpok", 0) / "images" / "seen_00.png").read_bytes() == b"png"

    evaluated_apart = tiny_config(tmp_path / "more_images")  # the same training, judged on more images
    evaluated_apart.methods, evaluated_apart.reuse_units_from = ["dpok"], str(tmp_path / "source")
    evaluated_apart.multi_eval_images = 4
    apart = Experiment(evaluated_apart, log=lambda m: None)
    assert apart.reusable_unit(task, apart.methods["dpok"], 0) is None
    (source.unit_dir("multi", "dpok", 0) / "run" / "config.json").unlink()  # results kept without their run
    assert exp.reusable_unit(task, m["dpok"], 0) is None


def test_only_ddpo_algorithms_read_ddpo_settings() -> None:
    """``reads_ddpo_settings`` lets a unit of another algorithm be reused whatever DDPO's settings were:
    it must be True exactly for the classes whose code reads them."""
    import inspect

    from dpok.algorithms import ALGORITHMS

    for name in ALGORITHMS.names():
        cls = ALGORITHMS.get(name)
        source = "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("dpok."))
        reads = "cfg.ddpo" in source or "inner_epochs" in source or "timestep_fraction" in source
        assert cls.reads_ddpo_settings == reads, name


def test_methods_that_ran_the_same_computation_are_named_not_counted_twice() -> None:
    from dpok.experiment import default_methods
    from dpok.report import identical_methods

    def unit(method: str, task: str, seed: int, judge: float) -> dict:
        return {"method": method, "task": task, "seed": seed, "splits": {"seen": {"judge_aligned_mean": judge}}}

    methods = default_methods()
    same = [unit(m, t, s, 0.5 + s / 10) for m in ("ddpo-is", "grpo") for t in ("color", "count") for s in (0, 1)]
    # GRPO equal to DDPO-IS on every unit both finished (a unit only one of them has does not count)
    assert identical_methods(same + [unit("grpo", "composition", 0, 0.1)], methods) == {"grpo": ("ddpo-is", 4)}
    # one differing unit, or no common unit, is not the same computation; the base never pairs
    differ = same[:-1] + [unit("grpo", "count", 1, 0.7)]
    assert identical_methods(differ, methods) == {}
    assert identical_methods([unit("grpo", "color", 0, 0.5), unit("ddpo-is", "color", 1, 0.5)], methods) == {}
    assert identical_methods([unit("base", "color", 0, 0.5), unit("dpok", "color", 0, 0.5)], methods) == {}
