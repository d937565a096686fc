"""Settings owned by their algorithms, seen as one flat list of options; the reward's settings; domains."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from dpok.algorithms import ALGORITHMS
from dpok.algorithms.base import UpdateResult
from dpok.cli import build_parser
from dpok.config import TrainConfig, build_config
from dpok.configfile import ConfigFileError, check_settings
from dpok.evaluate import EvalConfig
from dpok.options import from_options, group, option, option_fields, replace_options, to_options
from dpok.rewards.config import RewardConfig
from dpok.rewards.server import ServerConfig
from dpok.shapeworld.domain import DOMAIN as SHAPEWORLD
from dpok.trainer import prepare_prompts


def test_every_option_has_one_flat_name_and_round_trips() -> None:
    names = [o.name for o in option_fields(TrainConfig)]
    assert len(names) == len(set(names))
    # the algorithms' own settings and the reward's are nested, under the flat names users type
    paths = {o.name: o.path for o in option_fields(TrainConfig)}
    assert paths["alpha"] == ("dpok", "alpha") and paths["clip_range"] == ("policy_gradient", "clip_range")
    assert paths["reward"] == ("reward", "name") and paths["reward_model"] == ("reward", "model")
    assert paths["nft_beta"] == ("nft", "nft_beta") and paths["best_of"] == ("rejection", "best_of")
    cfg = TrainConfig.from_options(alpha=3.0, clip_range=0.2, reward="jpeg-compressibility", prompt=["a"], rounds=4)
    assert (cfg.dpok.alpha, cfg.policy_gradient.clip_range, cfg.reward.name, cfg.rounds) == (3.0, 0.2,
                                                                                            "jpeg-compressibility", 4)
    flat = cfg.to_dict()
    assert TrainConfig.from_options(flat) == cfg and flat["alpha"] == 3.0 and "dpok" not in flat
    assert replace_options(cfg, best_of=3).rejection.best_of == 3 and cfg.rejection.best_of == 8
    with pytest.raises(ValueError, match="unknown setting.*nope"):
        TrainConfig.from_options(nope=1)


@dataclass
class Inner:
    a: int = option(1, "a")
    b: str = option("x", "b", name="bee")


@dataclass
class Outer:
    inner: Inner = group(Inner, a=5)
    c: list[str] = option([], "c")


def test_a_group_may_set_its_own_defaults_for_one_command() -> None:
    assert Outer().inner.a == 5 and from_options(Outer, {"bee": "y"}) == Outer(Inner(5, "y"))
    assert {o.name: o.default() for o in option_fields(Outer)} == {"a": 5, "bee": "x", "c": []}
    assert to_options(Outer()) == {"a": 5, "bee": "x", "c": []}
    assert ServerConfig().reward.name == "" and RewardConfig().name == "shapeworld-alignment"


def test_each_settings_group_checks_its_own_values() -> None:
    for flat, message in ((dict(alpha=-1.0), "--alpha must be >= 0"), (dict(buffer_size=0), "--buffer-size must be >= 1"),
                          (dict(timestep_fraction=-0.1), "--timestep-fraction"),
                          (dict(timestep_fraction=1.5), "--timestep-fraction"),
                          (dict(rwr_percentile=100.0), "--rwr-percentile"), (dict(nft_beta=0.0), "--nft-beta"),
                          (dict(best_of=0), "--best-of must be >= 1"), (dict(reward=" "), "--reward is empty"),
                          (dict(stat_min_count=20, stat_buffer=16), "--stat-min-count")):
        with pytest.raises(ValueError, match=message):
            build_config(None, flat)


def test_literal_options_give_choices_on_the_command_line_and_in_config_files() -> None:
    kinds = {o.name: o.kind for o in option_fields(TrainConfig)}
    assert typing.get_args(kinds["kl_form"]) == ("closed-form", "epsilon")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--kl-form", "nope"])
    with pytest.raises(ValueError, match=r"--surrogate must be one of 'clamp', 'ppo' \(got 'nope'\)"):
        TrainConfig.from_options(surrogate="nope").validate()
    with pytest.raises(ConfigFileError, match="'kl_form' must be one of 'closed-form', 'epsilon'"):
        check_settings({"kl_form": "nope"}, TrainConfig, "f.yaml")
    assert check_settings({"kl-form": "epsilon"}, TrainConfig, "f.yaml") == {"kl_form": "epsilon"}


def test_train_help_lists_each_algorithms_options_under_its_own_heading() -> None:
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    for heading in ("DPOK (--algorithm dpok):", "DiffusionNFT (--algorithm diffusion-nft):", "reward:",
                    "policy gradient (dpok, ddpo-sf, ddpo-is, grpo"):
        assert heading in text
    dpok_part = text.split("DPOK (--algorithm dpok):")[1].split("\n\n")[0]
    assert "--value-lr" in dpok_part and "--clip-range" not in dpok_part
    assert "{closed-form,epsilon}" in text


def test_algorithm_names_and_constraints_come_from_the_registry() -> None:
    assert {"dpok", "ddpo-is", "grpo", "diffusion-nft", "rejection-sampling"} <= set(ALGORITHMS.names())
    with pytest.raises(ValueError, match="unknown; valid: .*ddpo-is"):
        build_config(None, {"algorithm": "ppo"})
    with pytest.raises(ValueError, match=r"--advantage value is not one --algorithm ddpo-is takes \(valid: group, tracker\)"):
        build_config(None, {"algorithm": "ddpo-is", "advantage": "value"})
    build_config(None, {"algorithm": "dpok", "advantage": "value"})
    assert ALGORITHMS.get("grpo").sample_minibatches and not ALGORITHMS.get("dpok").sample_minibatches
    assert build_config(None, {"algorithm": "ddpo-sf", "samples_per_round": 24}).resolved().minibatch_size == 24
    assert build_config(None, {"samples_per_round": 24}).resolved().minibatch_size == 32


def test_ddpo_is_and_grpo_default_to_the_update_shape_the_tuning_sweep_chose() -> None:
    """docs/tuning.md: minibatches of 8 samples and 40 % of the steps for DDPO-IS and GRPO; DDPO-SF keeps
    one pass over every step; what a user or a preset sets is kept."""
    for algorithm in ("ddpo-is", "grpo"):
        cfg = build_config(None, {"algorithm": algorithm}).resolved()
        assert (cfg.minibatch_size, cfg.ddpo.timestep_fraction) == (8, 0.4)
        assert build_config(None, {"algorithm": algorithm, "samples_per_round": 12}).resolved().minibatch_size == 6
        cfg = build_config(None, {"algorithm": algorithm, "minibatch_size": 16, "timestep_fraction": 1.0}).resolved()
        assert (cfg.minibatch_size, cfg.ddpo.timestep_fraction) == (16, 1.0)
    cfg = build_config(None, {"algorithm": "ddpo-sf"}).resolved()
    assert (cfg.minibatch_size, cfg.ddpo.timestep_fraction) == (32, 1.0)
    cfg = build_config("flow-grpo-paper", {}).resolved()
    assert (cfg.minibatch_size, cfg.ddpo.timestep_fraction) == (9, 0.99)
    # resolving twice changes nothing (a resumed run re-reads its resolved config.json)
    cfg = build_config(None, {"algorithm": "grpo"}).resolved()
    assert cfg.resolved() == cfg


def test_an_algorithm_refuses_a_model_family_it_is_not_defined_for_before_loading(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    # every shipped algorithm is defined for both families; one that says it is not is refused by name
    for name in ALGORITHMS.names():
        build_config(None, {"model": str(folder), "prompt": ["a cat"], "algorithm": name})
    monkeypatch.setattr(ALGORITHMS.get("sft-kl"), "families", ("diffusion",))
    with pytest.raises(ValueError, match=r"--algorithm sft-kl is not defined for flow-matching models"):
        build_config(None, {"model": str(folder), "prompt": ["a cat"], "algorithm": "sft-kl"})


def test_update_results_are_typed() -> None:
    result = UpdateResult.of({"loss": 1.0, "grad_norm": 2.0, "skipped_steps": 1.0})
    assert result.skipped_steps == 1 and result.skipped and result.stats == {"loss": 1.0, "grad_norm": 2.0}
    assert result.metrics() == {"loss": 1.0, "grad_norm": 2.0, "skipped_steps": 1.0}
    assert not UpdateResult().skipped and UpdateResult().metrics() == {}
    assert UpdateResult(skipped_updates=1).metrics() == {"skipped_updates": 1.0}


def test_the_reward_is_built_from_its_settings_in_one_place() -> None:
    reward = RewardConfig(name="jpeg-compressibility").build()
    assert reward.name == "jpeg-compressibility"
    assert RewardConfig(model="m", head="h", token="").options() == {"model": "m", "head": "h"}
    with pytest.raises(Exception, match="not accepted by reward"):
        RewardConfig(name="jpeg-compressibility", model="somewhere").build()
    assert EvalConfig.__dataclass_fields__["reward"].metadata["group"]
    with pytest.raises(ValueError, match="give --reward"):
        ServerConfig().validate()




def test_default_prompts_and_checks_come_from_the_domain() -> None:
    cfg = TrainConfig()
    assert prepare_prompts(cfg, SHAPEWORLD, SHAPEWORLD.default_prompts) == ["two white triangles"]
    with pytest.raises(ValueError, match="give training prompts"):
        prepare_prompts(cfg, None)
    with pytest.raises(ValueError, match="a red dog"):
        prepare_prompts(TrainConfig.from_options(prompt=["a red dog"]), SHAPEWORLD)
    assert prepare_prompts(TrainConfig.from_options(prompt=["a red dog"]), None) == ["a red dog"]
    images = torch.rand(2, 3, 64, 64)
    assert set(SHAPEWORLD.measures(images, "a red circle", 0)) == {
        "judge_aligned", "clean_share", "frechet", "judge_missing", "judge_extra", "judge_foreign",
        "judge_unrecognised", "judge_relation"}


def test_the_flow_grpo_preset_takes_the_papers_noise_level_on_a_flow_model(tmp_path: Path) -> None:
    # Flow-GRPO's SDE noise level 0.7 is --eta on a flow-matching model; a DDIM-family model keeps eta 1
    flow, ddim = tmp_path / "sd3", tmp_path / "sd15"
    for folder, name in ((flow, "StableDiffusion3Pipeline"), (ddim, "StableDiffusionPipeline")):
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": name}))
    assert build_config("flow-grpo-paper", {"model": str(flow), "prompt": ["a cat"]}).eta == 0.7
    assert build_config("flow-grpo-paper", {"model": str(ddim), "prompt": ["a cat"]}).eta == 1.0
    assert build_config("flow-grpo-paper", {"model": str(flow), "prompt": ["a cat"], "eta": 0.5}).eta == 0.5


def test_flow_matching_models_default_to_flow_grpos_noise_level(tmp_path: Path) -> None:
    from dpok.config import build_config

    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    assert build_config(None, {"model": str(folder)}).eta == 0.7
    assert build_config(None, {"model": str(folder), "eta": 0.3}).eta == 0.3  # the user's value wins
    assert build_config("ddpo-paper", {"model": str(folder)}).eta == 1.0  # and so does a preset's
    assert build_config(None, {}).eta == 1.0  # DDIM models keep DDPO's and DPOK's eta = 1
    # LoRA on both streams of the joint attention (Flow-GRPO's modules), not on UNet convolutions
    assert "add_q_proj" in build_config(None, {"model": str(folder)}).lora_targets
    assert "conv1" in build_config(None, {}).lora_targets


def test_beta_left_at_minus_one_is_each_algorithms_own_kl_weight() -> None:
    from dpok.algorithms.base import with_default_beta

    assert TrainConfig().policy_gradient.beta == -1
    dpok_beta = ALGORITHMS.get("dpok").default_beta
    assert dpok_beta != 0.01  # the sweep moved DPOK's own default away from the shared one
    for algorithm, beta in (("dpok", dpok_beta), ("grpo", 0.01), ("diffusion-nft", 0.01), ("ddpo-is", 0.01)):
        cfg = build_config(None, {"algorithm": algorithm})
        assert cfg.resolved().policy_gradient.beta == beta, algorithm
        assert with_default_beta(cfg).policy_gradient.beta == beta, algorithm
        # what the run records (config.json) is the value it used, never the sentinel
        assert cfg.resolved().to_dict()["beta"] == beta
    # a value given (0 included) and a preset's own are kept
    assert build_config(None, {"beta": 0.0}).resolved().policy_gradient.beta == 0.0
    assert build_config(None, {"beta": 2.5}).resolved().policy_gradient.beta == 2.5
    assert build_config("dpok-paper", {}).resolved().policy_gradient.beta == 0.01
    with pytest.raises(ValueError, match="--beta must be >= 0, or -1"):
        build_config(None, {"beta": -0.5})


def test_dpoks_default_beta_is_what_the_beta_sweep_chose() -> None:
    """docs/beta_sweep.md is written by benchmarks/beta_sweep.py from its kept trials; the default
    follows its choice, and the report says whether it does."""
    import re

    text = (Path(__file__).resolve().parents[2] / "docs" / "beta_sweep.md").read_text()
    chosen = float(re.search(r"By the rule, beta ([0-9.]+)", text).group(1))
    assert ALGORITHMS.get("dpok").default_beta == chosen
    assert "the chosen beta." in text and "not the chosen beta" not in text
