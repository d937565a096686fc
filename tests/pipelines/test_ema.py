"""``--ema-decay``: the EMA of the trainable weights, its arithmetic, its use in evaluation, its
files, and a resume that continues it bit for bit."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpok.config import build_config
from dpok.ema import PolicyEMA
from dpok.trainer import Trainer


def test_the_average_follows_every_optimizer_step() -> None:
    weight = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    ema = PolicyEMA([weight], decay=0.9, optimizer=optimizer)
    expected = weight.detach().clone()
    for n in range(1, 6):
        optimizer.zero_grad()
        (weight ** 2).sum().backward()
        optimizer.step()
        k = n - 1  # diffusers' warm-up: the first step copies the weights, then (1 + k) / (10 + k), capped
        decay = 0.0 if k == 0 else min(0.9, (1 + k) / (10 + k))
        expected = expected - (1 - decay) * (expected - weight.detach())
    assert ema.steps == 5
    raw = weight.detach().clone()
    with ema.applied():
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(weight.detach(), raw)  # restored exactly
    again = PolicyEMA([weight], 0.9, torch.optim.SGD([weight], lr=0.5))
    again.load_state_dict(json.loads(json.dumps({k: v for k, v in ema.state_dict().items() if k != "shadow_params"}))
                          | {"shadow_params": ema.state_dict()["shadow_params"]})
    assert again.steps == 5 and torch.equal(again.average.shadow_params[0], ema.average.shadow_params[0])
    with pytest.raises(ValueError, match="--ema-decay must be in"):
        build_config(None, {"ema_decay": 1.0})


def _cfg(pipeline: Path, reward_dir: Path, out: Path, **kw: object):  # noqa: ANN202
    values = dict(model=str(pipeline), alignment_model=str(reward_dir), reward="shapeworld-alignment+jpeg-compressibility",
                  prompt=["a red circle", "two blue squares"], output_dir=str(out), rounds=2, samples_per_round=2,
                  gradient_steps=2, num_steps=2, eval_images=1, learning_rate=1e-2, clip_range=0.1, ema_decay=0.9,
                  eval_every=1, eval_every_images=1, report_to=["none"])
    values.update(kw)
    return build_config(None, values)


def _weights(run: Path, folder: str) -> dict[str, torch.Tensor]:
    return load_file(run / folder / "pytorch_lora_weights.safetensors")


def test_ema_is_evaluated_saved_and_resumed_bit_for_bit(tiny_pipeline_dir: Path, tiny_reward_dir: Path,
                                                       tmp_path: Path) -> None:
    straight = Trainer(_cfg(tiny_pipeline_dir, tiny_reward_dir, tmp_path / "a"))
    straight.run()
    a = tmp_path / "a"
    raw, ema = _weights(a, "lora"), _weights(a, "lora_ema")
    assert raw.keys() == ema.keys() and any(not torch.equal(raw[k], ema[k]) for k in raw)
    assert (a / "lora_ema" / "lora_kohya.safetensors").is_file()
    summary = json.loads((a / "summary.json").read_text())
    assert summary["evaluated_weights"] == "ema" and "lora_ema" in summary["files"]
    with straight.evaluated_weights():  # what evaluations see is what lora_ema/ holds
        shown = {f"unet.{k}": v.detach().cpu().clone() for k, v in straight.adapter.lora_state_dict().items()}
    assert all(torch.equal(shown[k], ema[k]) for k in ema)
    assert "moving average" in (a / "lora" / "README.md").read_text()
    b = tmp_path / "b"
    interrupted = Trainer(_cfg(tiny_pipeline_dir, tiny_reward_dir, b))
    interrupted.stop_signal = signal.SIGTERM
    with pytest.raises(SystemExit):
        interrupted.run()
    resumed = Trainer(_cfg(tiny_pipeline_dir, tiny_reward_dir, b, resume=str(b)))
    assert resumed.ema is not None and resumed.ema.steps == interrupted.ema.steps > 0
    resumed.run()
    for folder in ("lora", "lora_ema"):
        x, y = _weights(a, folder), _weights(b, folder)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), folder
    assert (a / "eval.jsonl").read_text() == (b / "eval.jsonl").read_text()  # evaluations of the EMA, the same
