"""The shipped flow-matching ShapeWorld model: checksums, size, plain diffusers, one GRPO round."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from dpok.adapter import DiffusionAdapter
from dpok.config import build_config
from dpok.trainer import Trainer


def test_shipped_flow_model_matches_its_checksums_and_size(shipped_flow_model_dir: Path) -> None:
    lines = (shipped_flow_model_dir / "SHA256SUMS").read_text().split("\n")
    entries = [line.split("  ", 1) for line in lines if line.strip()]
    names = {name for _, name in entries}
    assert "transformer/diffusion_pytorch_model.safetensors" in names and "evaluation.json" in names
    for digest, name in entries:
        assert hashlib.sha256((shipped_flow_model_dir / name).read_bytes()).hexdigest() == digest, name
    sizes = sum(p.stat().st_size for p in shipped_flow_model_dir.rglob("*.safetensors"))
    assert sizes <= 20e6 and not list(shipped_flow_model_dir.rglob("*.bin"))
    assert "--family flow-matching" in (shipped_flow_model_dir / "PRETRAIN_COMMAND.txt").read_text()


def test_shipped_flow_model_draws_images_in_plain_diffusers_as_the_adapter_does(shipped_flow_model_dir: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    from dpok.generate import generate_images

    pipe = StableDiffusion3Pipeline.from_pretrained(shipped_flow_model_dir, text_encoder_3=None, tokenizer_3=None,
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    plain = pipe(["two blue squares"] * 2, num_inference_steps=4, guidance_scale=5.0,
                 generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert plain.shape == (2, 3, 64, 64) and plain.std() > 0.01  # not blank
    # the adapter (folded T5 tail, noise level 0) draws the same images as the stock pipeline
    adapter = DiffusionAdapter.from_pretrained("shapeworld-flow")
    assert adapter.is_flow and adapter.folded_text
    ours = generate_images(adapter, "two blue squares", 2, seed=3, num_steps=4, guidance_scale=5.0, eta=0.0)
    torch.testing.assert_close(ours, plain, atol=2e-4, rtol=0)


def test_one_grpo_round_on_the_shipped_flow_model(tmp_path: Path) -> None:
    cfg = build_config(None, dict(model="shapeworld-flow", algorithm="grpo", prompt=["two white triangles"], rounds=1,
                                  samples_per_round=4, sample_batch_size=4, minibatch_size=4, num_steps=4,
                                  eval_images=1, output_dir=str(tmp_path / "out")))
    assert cfg.eta == 0.7  # Flow-GRPO's noise level, read from the model folder's family
    trainer = Trainer(cfg)
    trainer.run()
    rows = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] and 0 <= rows[0]["reward/mean"] <= 1
    assert (trainer.out / "lora" / "pytorch_lora_weights.safetensors").is_file()
