"""The kohya export (ComfyUI, A1111) loads back in diffusers with the same images; the model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build_family_pipeline, pipeline_class

from dpok.adapter import DiffusionAdapter
from dpok.cli import main
from dpok.config import TrainConfig
from dpok.export import KOHYA_FILE, ExportError, export_kohya, read_lora, write_model_card

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out")
PROMPT = "two blue squares"


def _trained_lora(model: Path, folder: Path, rank: int = 4, alpha: float = 8.0) -> Path:
    """A LoRA with random (non-zero) B on attention, convolutions and projections, alpha != rank."""
    adapter = DiffusionAdapter.from_pretrained(str(model))
    adapter.add_lora(rank, alpha, TARGETS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in adapter.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    adapter.save_lora(folder)
    return folder


def _images(family: str, model: Path, lora: str | Path | None) -> np.ndarray:
    from diffusers import DDIMScheduler

    cls = pipeline_class(family)
    extra = {"safety_checker": None, "requires_safety_checker": False} if family != "sdxl" else {"add_watermarker": False}
    pipe = cls.from_pretrained(str(model), **extra)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    return pipe([PROMPT] * 2, num_inference_steps=3, guidance_scale=4.0, eta=1.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_export_loads_back_in_diffusers_with_the_same_images(family: str, tmp_path: Path) -> None:
    model = build_family_pipeline(family, tmp_path / family)
    folder = _trained_lora(model, tmp_path / "lora")
    kohya_file = export_kohya(folder)
    assert kohya_file == folder / KOHYA_FILE
    kohya = load_file(kohya_file)
    modules = {k.split(".")[0] for k in kohya}
    assert all(m.startswith("lora_unet_") for m in modules)
    assert all({f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= kohya.keys() for m in modules)
    assert {float(kohya[f"{m}.alpha"]) for m in modules} == {8.0}
    assert any("resnets" in m and m.endswith("conv1") for m in modules)  # convolutions exported too
    peft_format = _images(family, model, folder)
    from_kohya = _images(family, model, kohya_file)
    base = _images(family, model, None)
    difference = float(np.abs(peft_format - from_kohya).max())
    print(f"{family}: max pixel difference kohya vs diffusers LoRA {difference:.2e}, "
          f"LoRA vs base {np.abs(peft_format - base).max():.3f}")
    assert difference <= 1e-5
    assert np.abs(peft_format - base).max() > 0.05  # the LoRA changes the images, so equality means something
    # diffusers' converter alone sets alpha = rank (scale 1 instead of 2): the images would differ
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    weights, _ = read_lora(folder)
    save_file(convert_state_dict_to_kohya(weights), str(tmp_path / "rank_alpha.safetensors"))
    assert np.abs(_images(family, model, tmp_path / "rank_alpha.safetensors") - peft_format).max() > 1e-3


def _fake_run(run: Path, tiny_pipeline_dir: Path) -> None:
    """A finished run folder: settings, summary, grids, LoRA, metrics with an in-training evaluation."""
    from PIL import Image

    _trained_lora(tiny_pipeline_dir, run / "lora")
    cfg = TrainConfig(model=str(tiny_pipeline_dir), prompt=["a red circle", PROMPT], rounds=3, samples_per_round=4)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run / "config.yaml").write_text("rounds: 3\n")
    summary = {"reward_before": {"a red circle": 0.25, PROMPT: 0.5}, "reward_after": {"a red circle": 0.625, PROMPT: 0.75},
               "reward_before_mean": 0.375, "reward_after_mean": 0.6875, "rounds": 3, "reward_queries": 12,
               "eval_images_per_prompt": 2}
    (run / "summary.json").write_text(json.dumps(summary))
    for name in ("samples_before.png", "samples_after.png"):
        Image.new("RGB", (8, 8)).save(run / name)
    (run / "eval.jsonl").write_text(json.dumps({"round": 3, "eval/seen/reward_mean": 0.7}) + "\n")


def test_export_command_writes_the_kohya_file_and_a_hub_model_card(tiny_pipeline_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from huggingface_hub import ModelCard

    run = tmp_path / "run"
    _fake_run(run, tiny_pipeline_dir)
    assert main(["export", str(run)]) == 0
    assert (run / "lora" / KOHYA_FILE).is_file() and "model card" in capsys.readouterr().out
    card = ModelCard.load(run / "lora" / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"lora", "dpok", "text-to-image"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is no hub id
    assert card.data.widget[0]["output"]["url"] == "samples_after.png"
    text = card.text
    for expected in ("| a red circle | 0.250 | 0.625 |", "| **mean** | 0.375 | 0.688 |", "12 reward queries",
                     "`shapeworld-alignment`", "rank 8, alpha 8.0", "- two blue squares", "`eval/seen/reward_mean` | 0.700",
                     "after round 3",
                     "![samples after](samples_after.png)", KOHYA_FILE):
        assert expected in text, expected
    for name in ("samples_before.png", "samples_after.png", "config.yaml"):
        assert (run / "lora" / name).is_file(), name
    # the folder still loads in diffusers as it is (the kohya file beside the weights is not picked up)
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir).load_lora_weights(str(run / "lora"))


def test_export_of_what_is_not_a_run_names_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path)]) == 2
    assert "holds no pytorch_lora_weights.safetensors" in capsys.readouterr().err
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"")
    with pytest.raises(ExportError):
        write_model_card(tmp_path)
