"""`dpok pretrain` on a tiny config: completes, writes a loadable pipeline, resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpok.cli import main
from dpok.embedded.pretrain import STAGES, PretrainConfig, run_pretrain, tiny_config


@pytest.mark.slow  # the second full tiny pretrain; the default suite pretrains (and resumes) in the test below
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






def test_tiny_flow_pretrain_resumes_exactly_and_loads_in_plain_diffusers(tmp_path: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    from dpok.adapter import DiffusionAdapter

    def cfg(work: Path) -> PretrainConfig:
        c = tiny_config(str(work), "flow-matching")
        c.stages, c.unet_steps, c.checkpoint_every, c.eval_every = "transformer", 4, 100, 100
        return c

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_pretrain(cfg(straight))
    interrupted = cfg(resumed)
    interrupted.max_steps_per_run = 2
    with pytest.raises(RuntimeError, match="run the same command again to resume"):
        run_pretrain(interrupted)
    run_pretrain(interrupted)
    assert "transformer: resumed from" in (resumed / "pretrain.log").read_text()
    weights = "transformer/transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(straight / weights), load_file(resumed / weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert main(["pretrain", "--preset", "tiny", "--family", "flow-matching", "--work-dir", str(resumed),
                 "--stages", "export,report"]) == 0
    model = resumed / "export" / "model"
    sums = (model / "SHA256SUMS").read_text()
    assert "transformer/diffusion_pytorch_model.safetensors" in sums and "evaluation.json" in sums
    assert sum(p.stat().st_size for p in model.rglob("*.safetensors")) < 20 * 2**20
    # SD3 saved without T5 loads as diffusers documents it: the absent encoder passed as None
    pipe = StableDiffusion3Pipeline.from_pretrained(model, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    adapter = DiffusionAdapter.from_pretrained(str(model))
    assert adapter.is_flow and adapter.folded_text
    assert adapter.encode_prompts(["a red circle"]).cond.shape == (1, 17, 128)  # 16 CLIP tokens + the folded tail
