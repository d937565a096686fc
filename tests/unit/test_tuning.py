"""The tuning sweep behind the defaults: its curve measures, the choice of a method's setting, a
tiny sweep end to end (resume included) and the report it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dpok.config import TrainConfig
from dpok.tuning import Candidate, Sweep, SweepConfig, largest_drop, smoothed


def test_smoothed_is_a_trailing_mean_and_skips_nan() -> None:
    assert smoothed([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert smoothed([1.0, float("nan"), 3.0], window=3) == [1.0, 1.0, 2.0]
    assert math.isnan(smoothed([float("nan")])[0])


def test_largest_drop_is_the_fall_below_the_best_so_far() -> None:
    assert largest_drop([0.1, 0.2, 0.3]) == 0.0
    assert largest_drop([0.2, 0.9, 0.5, 0.8, 0.3]) == 0.9 - 0.3
    # a fall before a higher best counts too: the curve was unsteady then
    assert abs(largest_drop([0.5, 0.2, 1.0, 0.95]) - 0.3) < 1e-12


def _result(folder: Path, method: str, cand: str, prompt: str, judge: float, reward: float,
            stage: str = "trials", seed: int = 0) -> None:
    from dpok.evaluate import slug

    path = folder / stage / method / cand / slug(prompt) / f"seed{seed}" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"method": method, "candidate": cand, "prompt": prompt, "seed": seed,
                                "eval": {"judge_aligned": judge, "reward_mean": reward}}))


def test_chosen_is_the_best_mean_judge_then_reward_among_finished_candidates(tmp_path: Path) -> None:
    cands = [Candidate("a"), Candidate("b", (("learning_rate", 1.0),)), Candidate("c"), Candidate("d")]
    cfg = SweepConfig(output_dir=str(tmp_path), prompts=["p one", "p two"], methods={"m": cands})
    for prompt, judges in (("p one", (0.5, 0.7, 0.7, 1.0)), ("p two", (0.5, 0.5, 0.5, None))):
        for cand, j in zip("abcd", judges):
            if j is not None:
                _result(tmp_path, "m", cand, prompt, j, 0.9 if cand == "c" else 0.1)
    # b and c tie on the judge (0.6), c has the higher reward; d is unfinished and does not compete
    assert Sweep(cfg).chosen() == {"m": cands[2]}




def test_the_confirmation_chooses_among_the_screenings_best_two(tmp_path: Path) -> None:
    """Screening ranks a > b > c; the confirmation (other prompt and seed, more images) reverses a
    and b, and c, third in the screening, is no finalist whatever it scores. Until every finalist is
    confirmed the screening's best stays chosen; a method with unfinished candidates has no finalists."""
    cands = [Candidate("a"), Candidate("b"), Candidate("c")]
    cfg = SweepConfig(output_dir=str(tmp_path), prompts=["p"], methods={"m": cands, "n": cands},
                      confirm_top=2, confirm_prompts=["q"], confirm_seeds=[1])
    for cand, j in zip("abc", (0.9, 0.8, 0.1)):
        _result(tmp_path, "m", cand, "p", j, 0.5)
    _result(tmp_path, "n", "a", "p", 0.9, 0.5)  # n's b and c never finished
    sweep = Sweep(cfg)
    assert sweep.finalists() == {"m": cands[:2]}
    jobs = {(m, c.name, prompt, seed) for _, (m, c, prompt, seed) in sweep.jobs("confirmation")}
    assert jobs == {("base", "none", "q", 1), ("m", "a", "q", 1), ("m", "b", "q", 1)}
    _result(tmp_path, "m", "b", "q", 0.7, 0.5, stage="confirmation", seed=1)
    assert sweep.chosen() == {"m": cands[0], "n": cands[0]}  # a not confirmed yet
    _result(tmp_path, "m", "c", "q", 1.0, 0.5, stage="confirmation", seed=1)
    _result(tmp_path, "m", "a", "q", 0.6, 0.5, stage="confirmation", seed=1)
    assert sweep.chosen() == {"m": cands[1], "n": cands[0]}
    # a result of a seed the configuration does not name (kept from an earlier one) does not count
    _result(tmp_path, "m", "b", "q", 0.0, 0.0, stage="confirmation", seed=7)
    assert sweep.chosen()["m"] == cands[1]
    # without confirmation prompts, seeds or finalists the screening decides
    for off in ({"confirm_top": 0}, {"confirm_seeds": []}, {"confirm_prompts": []}):
        other = Sweep(SweepConfig(output_dir=str(tmp_path), prompts=["p"], methods={"m": cands},
                                  **{"confirm_prompts": ["q"], "confirm_seeds": [1], **off}))
        assert other.finalists() == {} and other.chosen() == {"m": cands[0]} and other.jobs("confirmation") == []
    assert sweep.images(sweep.trial_dir("confirmation", "m", "a", "q", 1)) == cfg.confirm_images
    assert sweep.images(sweep.trial_dir("trials", "m", "a", "p", 0)) == cfg.eval_images


def test_ties_go_to_the_reward_then_to_the_earlier_candidate(tmp_path: Path) -> None:
    """Screening: a, b, c tie on judge and reward, d ties on the judge with more reward: d, a, b, c.
    Confirmation of the two finalists d and a, tied on both: the screening's better, d."""
    cands = [Candidate(n) for n in "abcd"]
    cfg = SweepConfig(output_dir=str(tmp_path), prompts=["p"], methods={"m": cands}, confirm_top=2,
                      confirm_prompts=["q"], confirm_seeds=[1])
    for cand in "abcd":
        _result(tmp_path, "m", cand, "p", 0.5, 0.9 if cand == "d" else 0.1)
    sweep = Sweep(cfg)
    assert sweep.ranked() == {"m": [cands[3], cands[0], cands[1], cands[2]]}
    assert sweep.finalists() == {"m": [cands[3], cands[0]]}
    for cand in "ad":
        _result(tmp_path, "m", cand, "q", 0.6, 0.6, stage="confirmation", seed=1)
    assert sweep.chosen() == {"m": cands[3]}


def test_a_sweep_config_rejects_sizes_it_cannot_run() -> None:
    for bad in ({"confirm_top": -1}, {"confirm_images": 0}, {"eval_images": 0}, {"rounds": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SweepConfig(**bad)


def test_the_defaults_are_the_setting_the_committed_sweep_chose() -> None:
    """docs/tuning.md's raw results: the chosen DPOK candidate, applied to the settings the sweep ran
    from, gives today's defaults (a default changed without a new sweep fails here)."""
    from benchmark_scripts import load_benchmark

    root = Path(__file__).resolve().parents[2]
    tune = load_benchmark("tune")
    raw = root / "docs" / "tuning" / "data"
    saved = json.loads((raw / "sweep.json").read_text())
    config = saved["config"]
    confirm = {k: config[k] for k in ("confirm_top", "confirm_prompts", "confirm_seeds") if k in config}
    cfg = SweepConfig(output_dir=str(raw), prompts=config["prompts"], seeds=config["seeds"], methods=tune.candidates(),
                      **confirm)
    chosen = Sweep(cfg).chosen()["dpok"]
    tuned = {**saved["base"], **dict(chosen.overrides), "rounds": config["rounds"],
             "samples_per_round": config["samples_per_round"]}
    defaults = TrainConfig().to_dict()
    # --eval-images 0 (auto) is sized to the run: at the default budget, on the one default prompt, the sweep's 32
    defaults["eval_images"] = TrainConfig().eval_images_for(1)
    # an automatic default (0) agrees with the value it resolves to for DPOK at the default budget (the
    # sweep's frozen base records --minibatch-size 0 of older code as the 32 it meant then)
    resolved = TrainConfig().resolved().to_dict()
    # timestep_fraction is DDPO's and GRPO's (0: their own automatic value, checked below); DPOK reads none.
    # beta was chosen after this sweep by benchmarks/beta_sweep.py (test_settings checks DPOK's default
    # against that sweep's choice)
    differ = {k: (tuned[k], defaults[k]) for k in tuned
              if k in defaults and tuned[k] not in (defaults[k], resolved[k]) and k not in ("timestep_fraction", "beta")}
    assert not differ, f"defaults that are not the tuned setting (tuned, default): {differ}"
    # DDPO-IS's and GRPO's automatic update shape is the one their chosen candidates trained with
    for method in ("ddpo-is", "grpo"):
        shape = {k: v for k, v in Sweep(cfg).chosen()[method].overrides if k in ("minibatch_size", "timestep_fraction")}
        resolved = TrainConfig(algorithm=method).resolved().to_dict()
        assert shape == {k: resolved[k] for k in shape} and len(shape) == 2, (method, shape)


def test_report_says_when_methods_did_not_get_equal_care() -> None:
    """A method with unfinished candidates is named with its count, never 'the same tuning care'."""
    from types import SimpleNamespace

    from dpok.report_tuning import _care

    cfg = SimpleNamespace(prompts=["p"], seeds=[0], methods={"a": [Candidate("x"), Candidate("y")],
                                                             "b": [Candidate("x"), Candidate("y")]})
    done = [{"method": "a", "candidate": "x"}, {"method": "a", "candidate": "y"}, {"method": "b", "candidate": "x"}]
    assert "finished are a 2, b 1" in _care(cfg, done)
    assert _care(cfg, done + [{"method": "b", "candidate": "y"}]).startswith("Every method got the same tuning care: 2")


def test_a_candidate_changes_the_algorithms_own_settings_too(tmp_path: Path) -> None:
    # the algorithms' settings live in nested groups of TrainConfig; a sweep that filtered overrides
    # by its top-level fields silently trained every GRPO / DiffusionNFT candidate at the base values
    from dpok.config import build_config

    overrides = {"beta": 0.0, "timestep_fraction": 0.4, "clip_range": 1e-3, "rollout_steps": 10, "rollout_eta": 0.0,
                 "nft_beta": 0.5, "gamma": 0.2, "rwr_temperature": 0.05, "learning_rate": 1e-3}
    settings = Sweep(SweepConfig(output_dir=str(tmp_path)))._settings(overrides)
    assert {k: settings[k] for k in overrides} == overrides
    for algorithm, keys in (("grpo", ("beta", "timestep_fraction", "clip_range", "learning_rate")),
                            ("diffusion-nft", ("rollout_steps", "rollout_eta", "nft_beta"))):
        chosen = {k: overrides[k] for k in keys}
        settings = Sweep(SweepConfig(output_dir=str(tmp_path)))._settings({"algorithm": algorithm, **chosen})
        flat = build_config(None, settings).to_dict()
        assert {k: flat[k] for k in keys} == chosen


def test_a_base_frozen_before_the_automatic_update_shapes_keeps_its_whole_round_minibatch(tmp_path: Path) -> None:
    # --minibatch-size 0 meant the whole round (up to 32 samples) when the committed sweep froze its
    # base; read as today's automatic shape, an exploration of DDPO-IS from that base trained minibatches
    # of 8 on every step (timestep_fraction 1.0 frozen too): a mix no sweep trial ran
    from dpok.config import build_config

    base = {**TrainConfig().to_dict(), "minibatch_size": 0, "timestep_fraction": 1.0}
    (tmp_path / "sweep.json").write_text(json.dumps({"config": {}, "budget": {}, "base": base}))
    sweep = Sweep(SweepConfig(output_dir=str(tmp_path), samples_per_round=32))
    assert sweep.base()["minibatch_size"] == 32
    resolved = build_config(None, sweep._settings({"algorithm": "ddpo-is"})).resolved()
    assert (resolved.minibatch_size, resolved.to_dict()["timestep_fraction"]) == (32, 1.0)
    # a base frozen by today's code keeps 0: the algorithm's own shape
    (tmp_path / "sweep.json").write_text(json.dumps({"config": {}, "budget": {}, "base": base, "base_version": 2}))
    assert sweep.base()["minibatch_size"] == 0
    assert build_config(None, sweep._settings({"algorithm": "ddpo-is"})).resolved().minibatch_size == 8


def test_the_exploration_table_names_how_many_images_judged_each_trial() -> None:
    from dpok.report_tuning import _exploration

    def result(candidate: str, **extra: object) -> dict:
        return {"method": "dpok", "candidate": candidate, "prompt": "p", "overrides": {"learning_rate": 1e-3},
                "eval": {"judge_aligned": 0.5, "clean_share": 1.0, "reward_mean": 0.5}, "smoothed_drop": 0.0,
                "curve": {"reward": [0.5], "kl": [1.0]}, "seconds_per_round": 1.0, "seed": 0, **extra}

    lines = _exploration([result("old"), result("new", eval_images=256)])
    rows = {line.split(" | ")[1]: line.split(" | ")[5] for line in lines if line.startswith("| dpok")}
    assert rows == {"old": "32", "new": "256"}


def test_tune_rejects_eval_images_it_would_not_use(capsys: pytest.CaptureFixture[str]) -> None:
    """A negative count, or a count without --explore (the sweep judges every trial alike), is an
    error naming the option, not a silently ignored value."""
    from benchmark_scripts import load_benchmark

    tune = load_benchmark("tune")
    for argv in (["--explore", "dpok", "{}", "--eval-images", "-4"], ["--eval-images", "256"]):
        with pytest.raises(SystemExit):
            tune.parse(argv)
        assert "--eval-images" in capsys.readouterr().err
    assert tune.parse(["--explore", "dpok", "{}", "--eval-images", "256"]).eval_images == 256


def test_the_report_is_rewritten_from_the_kept_results_themselves(tmp_path: Path) -> None:
    """``tune.py --report-only --output-dir docs/tuning/data``: the sweep's folder is the report's kept
    raw folder, so there is nothing to copy (copying a file onto itself failed); elsewhere, a copy."""
    from dpok.report_tuning import _keep_raw

    kept = tmp_path / "docs" / "tuning" / "data"
    cfg = SweepConfig(output_dir=str(kept), prompts=["p"], methods={"m": [Candidate("a")]}, confirm_top=0)
    _result(kept, "m", "a", "p", 0.5, 0.5)
    before = {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    _keep_raw(Sweep(cfg), kept)
    assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == before
    _keep_raw(Sweep(cfg), tmp_path / "copy")
    assert {p.relative_to(tmp_path / "copy"): p.read_bytes() for p in (tmp_path / "copy").rglob("*")
            if p.is_file()} == before
