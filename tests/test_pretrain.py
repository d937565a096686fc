"""`dpok pretrain` on a tiny config: completes, writes a loadable pipeline, resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpok.cli import main
from dpok.embedded.pretrain import STAGES, PretrainConfig, run_pretrain, tiny_config
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


def test_tiny_pretrain_completes_and_the_pipeline_loads_in_diffusers(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    work = tmp_path / "work"
    assert main(["pretrain", "--preset", "tiny", "--work-dir", str(work), "--stages",
                 ",".join(s for s in STAGES if s != "report")]) == 0
    model = work / "export" / "model"
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    sums = (model / "SHA256SUMS").read_text()
    assert "unet/diffusion_pytorch_model.safetensors" in sums and "PRETRAIN_COMMAND.txt" in sums
    assert "dpok pretrain --preset tiny" in (model / "PRETRAIN_COMMAND.txt").read_text()
    assert (work / "export" / "reward" / "model.safetensors").is_file()
    assert "finished" in (work / "pretrain.log").read_text()


def _unet_weights(work: Path) -> dict[str, torch.Tensor]:
    return load_file(work / "unet" / "unet" / "diffusion_pytorch_model.safetensors")


def test_interrupted_pretrain_resumes_to_the_same_weights(tmp_path: Path) -> None:
    stages = "tokenizer,text,vae,unet"
    straight = tmp_path / "straight"
    run_pretrain(_cfg(straight, stages))
    resumed = tmp_path / "resumed"
    cfg = _cfg(resumed, stages)
    cfg.max_steps_per_run = 2
    for _ in range(10):  # every stage stops after 2 steps until all are done
        try:
            run_pretrain(cfg)
            break
        except RuntimeError as e:
            assert "run the same command again to resume" in str(e)
    log = (resumed / "pretrain.log").read_text()
    assert "unet: resumed from" in log and "vae: resumed from" in log
    text = "text/text_encoder/model.safetensors"
    ta, tb = load_file(straight / text), load_file(resumed / text)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # bit-identical
    a, b = _unet_weights(straight), _unet_weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical too
    assert not all(torch.equal(a[k], load_file(_fresh_unet(tmp_path))[k]) for k in a)


def _fresh_unet(tmp_path: Path) -> Path:
    from dpok.embedded.architecture import make_unet

    torch.manual_seed(0)
    make_unet().save_pretrained(tmp_path / "fresh-unet")
    return tmp_path / "fresh-unet" / "diffusion_pytorch_model.safetensors"


def _cfg(work: Path, stages: str) -> PretrainConfig:
    cfg = tiny_config(str(work))
    cfg.stages = stages
    cfg.unet_steps = 5
    cfg.vae_steps = 5
    cfg.checkpoint_every = 100  # only the interruption writes checkpoints mid-stage
    cfg.eval_every = 100
    return cfg


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
