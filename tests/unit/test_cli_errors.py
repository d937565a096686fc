"""The CLI's checks before any model loads, the diversity measure and resuming a run saved by an older version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpok.cli import main


def test_bad_inputs_fail_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--prompt", "a red dog"]) == 2
    assert "'a red dog' is outside the ShapeWorld grammar" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path / "missing"), "--prompt", "x", "--reward", "jpeg-compressibility"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--eta", "0"]) == 2
    assert "eta" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    bad = tmp_path / "prompts.txt"
    bad.write_text("a red circle\nthree blue dogs\n")
    assert main(["train", "--prompt-file", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "prompts.txt" in err and "line 2" in err


def test_diversity_is_zero_for_copies_and_grows_with_differences() -> None:
    from dpok.evaluate import diversity

    x = torch.rand(1, 3, 8, 8)
    assert diversity(x.repeat(3, 1, 1, 1)) == 0.0
    assert diversity(torch.cat([x, 1 - x])) > diversity(torch.cat([x, x * 0.9]))


def test_a_run_saved_before_a_setting_existed_resumes_as_it_ran(tmp_path: Path) -> None:
    """A run folder from before --lr-schedule ran at a constant rate: its resume keeps that rate, not
    today's default schedule."""
    from dpok.cli import resume_settings
    from dpok.config import TrainConfig

    saved = TrainConfig().to_dict()
    del saved["lr_schedule"], saved["lr_warmup_rounds"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    settings = resume_settings(str(tmp_path), {"resume": str(tmp_path)})
    assert settings["lr_schedule"] == "constant" and settings["lr_warmup_rounds"] == 0
    assert TrainConfig().lr_schedule == "cosine"



def test_a_resume_may_switch_the_exact_speed_options_but_not_autocast(tmp_path: Path) -> None:
    """--compile and --channels-last compute the same to float rounding; bf16 autocast does not."""
    from dpok.cli import resume_settings
    from dpok.config import TrainConfig

    (tmp_path / "config.json").write_text(json.dumps(TrainConfig().to_dict()))
    settings = resume_settings(str(tmp_path), {"resume": str(tmp_path), "compile": True, "channels_last": True})
    assert settings["compile"] and settings["channels_last"]
    with pytest.raises(ValueError, match="cannot change: autocast"):
        resume_settings(str(tmp_path), {"resume": str(tmp_path), "autocast": "bf16"})
