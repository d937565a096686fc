"""`dpok pretrain` settings and the tokenizer, without training: every grammar word one token, bad settings and
missing stages named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpok.cli import main
from dpok.embedded.tokenizer import build_tokenizer
from dpok.shapeworld import vocabulary


def test_tokenizer_makes_every_grammar_word_one_token(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    build_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_pretrained(tmp_path)
    for word in vocabulary():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))
    assert len(tok("an orange circle left of a red square").input_ids) == 10
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()


def test_bad_pretrain_settings_are_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--work-dir", str(tmp_path), "--stages", "tokenizer,fly"]) == 2
    assert "unknown pretraining stage" in capsys.readouterr().err
    assert main(["pretrain", "--work-dir", str(tmp_path), "--unet-steps", "0"]) == 2
    assert "unet_steps must be >= 1" in capsys.readouterr().err


def test_stage_needing_an_earlier_one_says_which(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--preset", "tiny", "--work-dir", str(tmp_path), "--stages", "unet"]) == 2
    err = capsys.readouterr().err
    assert "'tokenizer' has not finished" in err and "--stages tokenizer" in err
    json.dumps(err)



def test_flow_family_has_its_own_stages_and_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dpok.embedded.pretrain_config import FLOW_STAGES, STAGES, PretrainConfig, tiny_config

    assert PretrainConfig().stage_list() == list(STAGES)
    assert PretrainConfig(family="flow-matching").stage_list() == list(FLOW_STAGES)
    tiny = tiny_config(str(tmp_path), "flow-matching")
    assert tiny.reward_output_dir == ""  # the flow family is judged by the shipped reward, it trains none
    assert main(["pretrain", "--family", "flow", "--work-dir", str(tmp_path)]) == 2
    assert "family must be one of diffusion, flow-matching" in capsys.readouterr().err
    # a stage of the other family is named as unknown for this one
    assert main(["pretrain", "--family", "flow-matching", "--work-dir", str(tmp_path), "--stages", "unet"]) == 2
    assert "for family flow-matching; valid: transformer,export,report".replace(",", ", ") in capsys.readouterr().err
    assert main(["pretrain", "--family", "flow-matching", "--work-dir", str(tmp_path), "--flow-logit-std", "0"]) == 2
    assert "flow_logit_std must be > 0" in capsys.readouterr().err


def test_flow_export_before_training_and_a_bad_base_model_say_what_to_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "--family", "flow-matching", "--work-dir", str(tmp_path), "--stages", "export"]) == 2
    err = capsys.readouterr().err
    assert "'transformer' has not finished" in err and "--family flow-matching --stages transformer" in err
    assert main(["pretrain", "--family", "flow-matching", "--work-dir", str(tmp_path / "w"), "--base-model",
                 str(tmp_path / "nowhere"), "--stages", "transformer"]) == 2
    err = capsys.readouterr().err
    assert "base model folder" in err and "--base-model" in err
