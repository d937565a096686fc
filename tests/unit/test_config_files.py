"""Config files (YAML, TOML): parsing, checking against the typed settings, CLI precedence, presets,
run folders, and a run from a YAML file equal bit for bit to the same run from options."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpok.cli import build_parser, main, train_config
from dpok.config import PRESETS, TrainConfig, build_config
from dpok.configfile import (
    ConfigFileError,
    preset_file,
    preset_text,
    read_config_file,
    write_run_config,
)
from dpok.evaluate import EvalConfig
from dpok.generate import SampleConfig
from dpok.rewards.server import ServerConfig


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _train_cfg(argv: list[str]) -> tuple[TrainConfig, str]:
    return train_config(build_parser().parse_args(["train", *argv]))


def test_yaml_and_toml_files_give_the_same_typed_settings(tmp_path: Path) -> None:
    yaml_file = _write(tmp_path / "a.yaml", "learning-rate: 5e-4\nrounds: 3\nalpha: 2\nprompt: two white triangles\n"
                                            "value_first: true\nlora_targets: to_q,to_v\n")
    toml_file = _write(tmp_path / "a.toml", 'learning-rate = 5e-4\nrounds = 3\nalpha = 2\nprompt = "two white triangles"\n'
                                            'value_first = true\nlora_targets = "to_q,to_v"\n')
    a, b = read_config_file(yaml_file, TrainConfig), read_config_file(toml_file, TrainConfig)
    assert a.values == b.values == {"learning_rate": 5e-4, "rounds": 3, "alpha": 2.0, "prompt": ["two white triangles"],
                                    "value_first": True, "lora_targets": "to_q,to_v"}
    assert isinstance(a.values["learning_rate"], float) and isinstance(a.values["alpha"], float)  # 5e-4 is no string
    assert (a.format, b.format) == ("yaml", "toml") and a.lines["rounds"] == b.lines["rounds"] == 2


def test_unknown_key_names_file_line_and_nearest_valid_key(tmp_path: Path) -> None:
    for name, text in (("bad.yaml", "rounds: 2\nlearning_rat: 1e-4\n"), ("bad.toml", "rounds = 2\nlearning_rat = 1e-4\n")):
        with pytest.raises(ConfigFileError) as e:
            read_config_file(_write(tmp_path / name, text), TrainConfig)
        message = str(e.value)
        assert f"{tmp_path / name}, line 2" in message and "'learning_rat'" in message
        assert "did you mean 'learning_rate'" in message


@pytest.mark.parametrize(("text", "expected"), [
    ("rounds: two\n", "'rounds' must be an integer, not 'two'"),
    ("rounds: 2.5\n", "'rounds' must be an integer, not 2.5"),
    ("learning_rate: fast\n", "'learning_rate' must be a number, not 'fast'"),
    ("value_first: 1\n", "'value_first' must be true or false, not 1"),
    ("model: 1.5\n", "'model' must be a string (quote it to make it a string), not 1.5"),
    ("prompt: [1, 2]\n", "'prompt' must be a list of strings, not list"),
    ("rounds:\n", "'rounds' has no value"),
])
def test_wrong_types_name_the_key_and_line(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path / "c.yaml", "seed: 1\n" + text)
    with pytest.raises(ConfigFileError) as e:
        read_config_file(path, TrainConfig)
    assert f"{path}, line 2: {expected}" in str(e.value)


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    cases = {
        tmp_path / "missing.yaml": "does not exist",
        tmp_path: "is a directory",
        _write(tmp_path / "x.json", "{}"): "name it *.yaml, *.yml or *.toml",
        _write(tmp_path / "syntax.yaml", "rounds: 2\nalpha: [1,\n"): "not valid YAML",
        _write(tmp_path / "syntax.toml", "rounds = 2\nalpha = \n"): "line 2",
        _write(tmp_path / "list.yaml", "- rounds\n- alpha\n"): "the top level must be a mapping",
        _write(tmp_path / "twice.yaml", "rounds: 2\nrounds: 3\n"): "line 2: key 'rounds' is given twice",
    }
    (tmp_path / "latin1.yaml").write_bytes("prompt: caf\xe9\n".encode("latin-1"))
    cases[tmp_path / "latin1.yaml"] = "not UTF-8 text (invalid byte at line 1)"
    for path, expected in cases.items():
        with pytest.raises(ConfigFileError) as e:
            read_config_file(path, TrainConfig)
        assert str(path) in str(e.value) and expected in str(e.value), (path, str(e.value))
    with pytest.raises(ConfigFileError, match=r"syntax\.yaml, line 3"):
        read_config_file(tmp_path / "syntax.yaml", TrainConfig)


def test_bad_config_files_stop_every_command_before_anything_is_written(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = _write(tmp_path / "bad.yaml", "rounds: 2\nsamples_per_rond: 4\n")
    out = tmp_path / "out"
    folder_option = {"train": "--output-dir", "eval": "--output-dir", "sample": "--output-dir", "pretrain": "--work-dir"}
    for command in ("train", "eval", "sample", "pretrain", "reward-server"):
        where = [folder_option[command], str(out)] if command in folder_option else []
        assert main([command, "--config", str(bad), *where]) == 2
        err = capsys.readouterr().err
        assert f"dpok {command}: error" in err and f"{bad}, line 2" in err and "samples_per_rond" in err, (command, err)
    # a value that parses but fails validation names the option, the file and the line
    invalid = _write(tmp_path / "invalid.yaml", "rounds: 2\neta: 0\n")
    assert main(["train", "--config", str(invalid), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--eta must be > 0" in err and f"({invalid}, line 2)" in err
    assert main(["train", "--config", str(tmp_path / "nope.toml"), "--output-dir", str(out)]) == 2
    assert "nope.toml does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_command_line_options_override_the_file_and_the_file_overrides_the_preset(tmp_path: Path) -> None:
    path = _write(tmp_path / "run.yaml", "preset: dpok-paper\nrounds: 7\nlearning_rate: 3e-5\nprompt: [a red circle]\n"
                                        "model: shapeworld\nreward: shapeworld-alignment\n")
    cfg, fmt = _train_cfg(["--config", str(path), "--rounds", "9"])
    assert fmt == "yaml" and cfg.rounds == 9 and cfg.learning_rate == 3e-5 and cfg.prompt == ["a red circle"]
    assert cfg.dpok.alpha == PRESETS["dpok-paper"]()["alpha"]
    assert cfg.policy_gradient.kl_form == "epsilon"  # the preset's, not the defaults
    cfg, fmt = _train_cfg(["--config", str(path), "--preset", "ddpo-paper", "--reward", "jpeg-compressibility"])
    assert cfg.algorithm == "ddpo-is" and cfg.rounds == 7 and cfg.reward.name == "jpeg-compressibility"


def test_other_commands_read_their_own_settings(tmp_path: Path) -> None:
    from dpok.cli import settings

    parser = build_parser()
    for command, cls, text, option, expected in (
        ("eval", EvalConfig, "num_images: 3\nunseen-prompt-set: heldout\n", "--num-images", {"num_images": 5}),
        ("sample", SampleConfig, "num_images: 3\nprompt: [a red circle]\n", "--num-images", {"num_images": 5}),
        ("reward-server", ServerConfig, "reward: jpeg-compressibility\nmax_images: 3\n", "--max-images",
         {"max_images": 5}),
    ):
        path = _write(tmp_path / f"{command}.toml" if command == "eval" else tmp_path / f"{command}.yaml",
                      text.replace(": ", " = ").replace("heldout", '"heldout"') if command == "eval" else text)
        values, source = settings(parser.parse_args([command, "--config", str(path), option, "5"]), cls)
        assert source is not None and expected.items() <= values.items()
        cls(**values)  # every value fits the dataclass
    server = ServerConfig(**settings(parser.parse_args(["reward-server", "--config", str(tmp_path / "reward-server.yaml")]),
                                     ServerConfig)[0])
    assert server.limits().max_images == 3 and server.reward == "jpeg-compressibility"


def test_shipped_preset_files_are_the_presets(tmp_path: Path) -> None:
    for name, preset in PRESETS.items():
        path = preset_file(name)
        assert path.is_file(), f"{path} is missing: write it with 'dpok presets --write dpok/presets'"
        assert path.read_text(encoding="utf-8") == preset_text(name), \
            f"{path} differs from preset {name!r}: rewrite it with 'dpok presets --write dpok/presets'"
        # a preset's flow-model settings are conditional: the file names them in its comments
        values = {k: v for k, v in preset().items() if k != "flow_overrides"}
        assert read_config_file(path, TrainConfig).values == values
        from_file, _ = _train_cfg(["--config", str(path), "--prompt", "a red circle"])
        assert from_file == build_config(name, {"prompt": ["a red circle"]})


def test_run_config_round_trips_in_both_formats(tmp_path: Path) -> None:
    cfg = build_config("ddpo-paper", {"prompt": ["a red circle", "two blue squares"], "output_dir": str(tmp_path / "r")})
    for fmt in ("yaml", "toml"):
        path = write_run_config(cfg, tmp_path, fmt)
        assert path.name == f"config.{fmt}" and "output_dir" not in path.read_text()
        again, got_fmt = _train_cfg(["--config", str(path), "--output-dir", str(tmp_path / "r")])
        assert got_fmt == fmt and again == cfg




