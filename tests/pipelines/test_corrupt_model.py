"""A corrupt model weight file is named."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_a_corrupt_model_weight_file_is_named(tmp_path: Path, tiny_pipeline_dir: Path) -> None:
    import shutil

    from dpok.adapter import DiffusionAdapter, ModelLoadError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipeline_dir, broken)
    weights = broken / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="cannot load model"):
        DiffusionAdapter.from_pretrained(str(broken))

