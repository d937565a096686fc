"""The Python API: the README's example runs as written; a pipeline object, a prompt function and a
metadata-aware reward from Python."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import dpok

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_python_example() -> str:
    """The first ```python block of the README's 'Python API' section, as written."""
    section = README.read_text().split("## Python API", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the README's Python API section has no python code block"
    return match.group(1)


def test_the_readme_python_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = readme_python_example()
    assert len([line for line in code.splitlines() if line.strip()]) <= 10
    monkeypatch.chdir(tmp_path)  # the run folder goes to ./runs/
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the documented example itself
    result = namespace["result"]
    assert isinstance(result, dpok.RunResult) and result.output_dir.is_dir()
    assert result.output_dir.resolve().parent == (tmp_path / "runs").resolve()
    assert (result.output_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    saved = json.loads((result.output_dir / "config.json").read_text())
    assert saved["reward"] == "python:redness" and saved["rounds"] == 2
    assert np.isfinite(result.reward_before) and np.isfinite(result.reward_after)
    assert str(result.output_dir) in capsys.readouterr().out


def test_pipeline_object_prompt_function_and_metadata(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    colours = {"a red circle": 0, "a green square": 1, "a blue triangle": 2}
    seen: list[tuple[str, dict]] = []

    def prompt_fn(rng: np.random.Generator) -> tuple[str, dict]:
        prompt = list(colours)[int(rng.integers(len(colours)))]
        return prompt, {"channel": colours[prompt]}

    def colour_reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        seen.extend(zip(prompts, metadata))
        channel = torch.tensor([m["channel"] for m in metadata])
        return images.mean(dim=(2, 3))[torch.arange(len(images)), channel]

    result = dpok.train(reward=colour_reward, prompts=prompt_fn, pipeline=pipe, output_dir=str(tmp_path / "run"),
                        rounds=2, samples_per_round=4, num_steps=2, eval_images=1, gradient_steps=1,
                        report_to=["none"])
    assert result.output_dir == tmp_path / "run" and (result.output_dir / "summary.json").is_file()
    assert seen and all(meta == {"channel": colours[p]} for p, meta in seen)  # every call had the right metadata
    assert {p for p, _ in seen} <= set(colours)
    assert getattr(pipe.unet, "peft_config", None)  # the pipeline object itself got the LoRA
    saved = json.loads((result.output_dir / "config.json").read_text())
    assert saved["model"] == str(tiny_pipeline_dir) and saved["reward"].endswith("colour_reward")


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(TypeError, match="unknown setting.*roundz"):
        dpok.train(roundz=3)
    with pytest.raises(TypeError, match="reward must be a function"):
        dpok.train(reward=3)
    with pytest.raises(TypeError, match="not one string"):
        dpok.train(prompts="a red circle")
    with pytest.raises(ValueError, match="--eta must be > 0"):
        dpok.train(eta=0.0)
