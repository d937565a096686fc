"""End-to-end: the CLI on the embedded model (subprocess) and on a tiny pipeline (in process)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpok.cli import main
from dpok.config import build_config
from dpok.trainer import Trainer


def _tiny_cfg(pipeline: Path, reward_dir: Path, out: Path, **kw: object):  # noqa: ANN202
    values = dict(model=str(pipeline), alignment_model=str(reward_dir), prompt=["a red circle", "two blue squares"],
                  output_dir=str(out), rounds=3, samples_per_round=2, sample_batch_size=2, minibatch_size=2,
                  gradient_steps=2, num_steps=3, eval_images=1, learning_rate=1e-2, clip_range=0.1)
    values.update(kw)
    return build_config(None, values)


SCHEDULE = {"lr_schedule": "linear", "lr_warmup_rounds": 1}


@pytest.mark.parametrize("algorithm", ["dpok", "ddpo-is"])
def test_sigterm_then_resume_is_bit_identical(tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path: Path,
                                               algorithm: str) -> None:
    straight = Trainer(_tiny_cfg(tiny_pipeline_dir, tiny_reward_dir, tmp_path / "a", algorithm=algorithm,
                                 stat_min_count=1, stat_buffer=4, **SCHEDULE))
    straight.run()
    interrupted = Trainer(_tiny_cfg(tiny_pipeline_dir, tiny_reward_dir, tmp_path / "b", algorithm=algorithm,
                                    stat_min_count=1, stat_buffer=4, **SCHEDULE))
    interrupted.stop_signal = signal.SIGTERM  # as if SIGTERM arrived during round 1
    with pytest.raises(SystemExit) as code:
        interrupted.run()
    assert code.value.code == 143
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["round-000001"]
    resumed = Trainer(_tiny_cfg(tiny_pipeline_dir, tiny_reward_dir, tmp_path / "b", algorithm=algorithm,
                                stat_min_count=1, stat_buffer=4, resume=str(tmp_path / "b"), **SCHEDULE))
    assert resumed.round == 1
    resumed.run()
    a = load_file(tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    rows_b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    strip = lambda rows: [{k: v for k, v in json.loads(r).items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)
    # one warm-up round at half the rate, then linear decay over the remaining two rounds
    assert [json.loads(r)["train/learning_rate"] for r in rows_a] == pytest.approx([5e-3, 1e-2, 5e-3])


def test_checkpoints_keep_only_the_newest(tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path: Path) -> None:
    Trainer(_tiny_cfg(tiny_pipeline_dir, tiny_reward_dir, tmp_path, checkpoint_every=1, keep_checkpoints=2)).run()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-000002", "round-000003"]
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        Trainer(_tiny_cfg(tiny_pipeline_dir, tiny_reward_dir, tmp_path))
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # nothing lost




def test_sample_and_eval_commands(tmp_path: Path, shipped_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "samples"
    assert main(["sample", "--prompt", "a red circle", "--prompt", "two blue squares", "--num-images", "2",
                 "--num-steps", "3", "--output-dir", str(out)]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index == {"p000_i000.png": "a red circle", "p000_i001.png": "a red circle",
                     "p001_i000.png": "two blue squares", "p001_i001.png": "two blue squares"}
    assert all((out / name).is_file() for name in index)
    ev = tmp_path / "eval"
    assert main(["eval", "--prompt", "a red circle", "--unseen-prompt-set", "heldout", "--num-images", "2",
                 "--num-steps", "3", "--output-dir", str(ev)]) == 0
    result = json.loads((ev / "eval.json").read_text())
    assert set(result["splits"]) == {"seen", "unseen"}
    row = result["splits"]["seen"]["prompts"]["a red circle"]
    assert 0 <= row["reward_mean"] <= 1 and 0 <= row["judge_aligned"] <= 1 and 0 <= row["clean_share"] <= 1
    assert row["diversity"] > 0 and row["frechet"] >= 0 and row["kl_to_base"] == 0.0  # no LoRA: the base itself
    assert (ev / "grid_seen.png").is_file() and "unseen" in capsys.readouterr().out
    assert len(list((ev / "grids").glob("unseen_*.png"))) == len(result["splits"]["unseen"]["prompts"])


def test_all_invalid_rewards_skip_updates_then_stop_the_run(tiny_pipeline_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from dpok.trainer import TrainingDiverged

    (tmp_path / "nan_reward_mod.py").write_text(
        "import torch\ndef reward(images, prompts):\n    return torch.full((len(images),), float('nan'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _tiny_cfg(tiny_pipeline_dir, tmp_path, tmp_path / "run", reward="nan_reward_mod:reward",
                    alignment_model="", max_bad_rounds=2, rounds=5)
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.adapter.unet.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="2 rounds in a row"):
        trainer.run()
    after = trainer.adapter.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/invalid"] for r in rows] == [2.0, 2.0]




