"""``--report-to``: scalars and image grids reach TensorBoard and (offline) wandb through accelerate."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import numpy as np
import pytest

from dpok.config import build_config
from dpok.trackers import Trackers, parse_report_to
from dpok.trainer import Trainer


def _tensorboard(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """Scalars (tag -> [(step, value)]) and image tags of the events in ``folder``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, events.Tags()["images"]


def _wandb_history(run_dir: Path) -> list[dict[str, str]]:
    """The history rows of the offline wandb run in ``run_dir`` (read back with wandb's own reader)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    store = datastore.DataStore()
    store.open_for_scan(path)
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_report_to_names_are_checked() -> None:
    assert parse_report_to(["tensorboard,wandb", "wandb"]) == ["tensorboard", "wandb"]
    assert parse_report_to(["none"]) == []
    with pytest.raises(ValueError, match="--report-to mlflow is unknown; valid: tensorboard, wandb or none"):
        parse_report_to(["mlflow"])
    with pytest.raises(ValueError, match="none cannot be combined"):
        parse_report_to(["none", "tensorboard"])
    with pytest.raises(ValueError, match="--report-to"):
        build_config(None, {"report_to": ["tensorbord"]})


def test_scalars_and_images_reach_tensorboard_and_offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    trackers = Trackers(["tensorboard", "wandb"], tmp_path, {"learning_rate": 1e-3, "prompt": ["a", "b"]})
    trackers.log({"reward/mean": 0.25, "kl/rollout": float("nan")}, step=1)
    trackers.log({"reward/mean": 0.5}, step=2)
    trackers.log_image("samples/after", np.full((6, 10, 3), 200, np.uint8), step=2)
    trackers.finish()
    scalars, images = _tensorboard(tmp_path / "tensorboard")
    assert scalars["reward/mean"] == [(1, 0.25), (2, 0.5)] and "kl/rollout" not in scalars  # NaN left out
    assert images == ["samples/after"]
    history = _wandb_history(tmp_path)
    assert [float(r["reward/mean"]) for r in history if "reward/mean" in r] == [0.25, 0.5]
    assert any(json.loads(r.get("samples/after/width", "0")) == 10 for r in history)
    assert list((tmp_path / "wandb").glob("offline-run-*/files/media/images/samples/after_*.png"))
    assert json.loads((tmp_path / "trackers.json").read_text())["wandb_id"]


@pytest.mark.slow  # the trackers themselves are checked without training above
def test_a_training_run_reports_rounds_evaluations_and_grids(tiny_pipeline_dir: Path, tiny_reward_dir: Path,
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    cfg = build_config(None, dict(model=str(tiny_pipeline_dir), alignment_model=str(tiny_reward_dir),
                                  prompt=["a red circle"], output_dir=str(run), rounds=2, samples_per_round=2,
                                  gradient_steps=1, num_steps=2, eval_images=1, eval_every=2, eval_every_images=1,
                                  report_to=["tensorboard", "wandb"]))
    Trainer(cfg).run()
    scalars, images = _tensorboard(run / "tensorboard")
    assert [s for s, _ in scalars["reward/mean"]] == [1, 2]
    assert [s for s, _ in scalars["eval/seen/reward_mean"]] == [0, 2]
    assert set(images) == {"samples/before", "samples/after", "eval/grid"}
    history = _wandb_history(run)
    assert [r["_step"] for r in history if "reward/mean" in r] == ["1", "2"]
    assert {"eval/seen/judge_aligned", "samples/before/_type", "eval/grid/_type"} <= {k for r in history for k in r}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [float(r["reward/mean"]) for r in history if "reward/mean" in r] == [r["reward/mean"] for r in rows]


def test_report_to_none_writes_no_tracker_files(tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Trainer(build_config(None, dict(model=str(tiny_pipeline_dir), alignment_model=str(tiny_reward_dir),
                                    prompt=["a red circle"], output_dir=str(run), rounds=1, samples_per_round=2,
                                    gradient_steps=1, num_steps=2, eval_images=1, report_to=["none"]))).run()
    assert (run / "metrics.jsonl").is_file() and not (run / "tensorboard").exists() and not (run / "wandb").exists()
