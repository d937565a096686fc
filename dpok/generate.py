"""``dpok sample``: images from a model (optionally with a LoRA) through the plain diffusers pipeline."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .adapter import DiffusionAdapter
from .domains import model_domain
from .options import option, option_errors

_f = option


@dataclass
class SampleConfig:
    """Settings of ``dpok sample`` (the keyword arguments of :func:`write_samples`)."""

    model: str = _f("shapeworld", "pipeline folder, hub id, 'shapeworld' or 'shapeworld-flow'")
    lora: str = _f("", "LoRA folder of a run (its 'lora/' folder) to load")
    prompt: list[str] = field(default_factory=list, metadata={"help": "a prompt (at least one)"})
    num_images: int = _f(4, "images per prompt")
    seed: int = _f(0, "seed")
    output_dir: str = _f("", "folder for the PNGs and index.json (required)")
    num_steps: int = _f(20, "DDIM steps")
    guidance_scale: float = _f(5.0, "guidance scale")
    eta: float = _f(1.0, "DDIM eta (flow models: the SDE noise level a), 0 = deterministic")
    batch_size: int = _f(16, "images per forward batch")
    device: str = _f("auto", "'auto', 'cpu' or 'cuda[:N]'")

    def validate(self) -> None:
        """Check every value before any model loads; raise ValueError naming the option."""
        errors = option_errors(self)
        if not self.prompt:
            errors.append("give at least one --prompt")
        if not self.output_dir:
            errors.append("give --output-dir, the folder for the PNGs and index.json")
        for name in ("num_images", "num_steps", "batch_size"):
            if getattr(self, name) < 1:
                errors.append(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.eta < 0:
            errors.append(f"--eta must be >= 0 (got {self.eta})")
        if errors:
            raise ValueError("invalid settings:\n  " + "\n  ".join(errors))


def validate_prompts_for(model: str, prompts: list[str]) -> None:
    """Prompts must be in the grammar of the model's domain, if it has one (e.g. the embedded
    model's ShapeWorld grammar); checked before the model loads."""
    if not prompts:
        raise ValueError("give at least one --prompt")
    domain = model_domain(model)
    if domain is not None:
        for p in prompts:
            domain.check_prompt(p)


def generate_images(adapter: DiffusionAdapter, prompt: str, num_images: int, seed: int, num_steps: int,
                    guidance_scale: float, eta: float, batch_size: int = 16) -> torch.Tensor:
    """``num_images`` images (N, 3, H, W) in [0, 1] for one prompt, from one seeded generator.

    A flow model (SD3, FLUX) samples with the training sampler: Flow-GRPO's SDE at noise level
    ``eta``, or at 0 its pipeline's Euler ODE (the same images as the pipeline)."""
    gen = torch.Generator().manual_seed(seed)
    if adapter.is_flow:
        from .sampling import sample_in_batches

        return sample_in_batches(adapter, [prompt] * num_images, batch_size, num_steps, eta, guidance_scale, gen,
                                 with_log_probs=False).images.cpu()
    out = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        images = adapter.pipe([prompt] * n, num_inference_steps=num_steps, guidance_scale=guidance_scale, eta=eta,
                              generator=gen, output_type="np").images
        out.append(torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float())
    return torch.cat(out)


def write_samples(model: str, lora: str, prompts: list[str], num_images: int, seed: int, output_dir: str,
                  num_steps: int = 20, guidance_scale: float = 5.0, eta: float = 1.0, device: str = "auto",
                  batch_size: int = 16) -> dict[str, str]:
    """Write ``p{prompt:03d}_i{image:03d}.png`` files and ``index.json`` (file name -> prompt)."""
    validate_prompts_for(model, prompts)
    if not output_dir:
        raise ValueError("give --output-dir, the folder for the PNGs and index.json")
    for name, value in (("--num-images", num_images), ("--num-steps", num_steps), ("--batch-size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1 (got {value})")
    if eta < 0:
        raise ValueError(f"--eta must be >= 0 (got {eta})")
    adapter = DiffusionAdapter.load(model, lora, device)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, str] = {}
    for i, prompt in enumerate(prompts):
        images = generate_images(adapter, prompt, num_images, seed + 1000 * i, num_steps, guidance_scale, eta,
                                 batch_size)
        for j, img in enumerate(images):
            name = f"p{i:03d}_i{j:03d}.png"
            array = (img.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
            Image.fromarray(array).save(out / name)
            index[name] = prompt
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
