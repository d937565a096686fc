"""Reliability: guarded optimizer steps, atomic checkpoints, corrupt files, kill -9 and resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpok.algorithms.base import guarded_step
from dpok.checkpoint import latest_checkpoint, list_complete, write_checkpoint
from dpok.utils.state_io import CheckpointError


def test_non_finite_gradient_skips_the_step_and_leaves_weights_bitwise_unchanged() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    guarded_step(opt, list(model.parameters()), 1.0)  # one good step creates optimizer state
    before = [p.clone() for p in model.parameters()]
    state_before = {k: v["exp_avg"].clone() for k, v in opt.state.items()}
    (model(torch.randn(4, 3)).sum() * float("nan")).backward()
    stats = guarded_step(opt, list(model.parameters()), 1.0)
    assert stats["skipped_steps"] == 1.0 and not torch.isfinite(torch.tensor(stats["grad_norm"]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(state_before[k], v["exp_avg"]) for k, v in opt.state.items())
    assert all(p.grad is None for p in model.parameters())


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    write_checkpoint(tmp_path, 1, {"w": torch.ones(3), "round": 1}, keep=1)
    import dpok.utils.state_io as state_io

    def crash(tensors: dict, path: Path) -> None:
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(state_io, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(tmp_path, 2, {"w": torch.zeros(3), "round": 2}, keep=1)
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "round-000001" and state["round"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in list_complete(tmp_path)] == ["round-000001"]


def test_a_corrupt_checkpoint_is_named(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, keep=2)
    path = write_checkpoint(tmp_path, 2, {"w": torch.ones(3)}, keep=2)
    data = (path / "state.safetensors").read_bytes()
    (path / "state.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="round-000002.*corrupt or truncated.*round-000001"):
        latest_checkpoint(tmp_path)












def test_a_checkpoint_cut_off_between_its_two_renames_is_put_back(tmp_path: Path) -> None:
    from dpok.checkpoint import checkpoint_path

    path = write_checkpoint(tmp_path, 3, {"w": torch.ones(2)}, keep=1)
    # a kill while round 3 was rewritten: the old copy moved aside, the new one complete in .tmp
    path.rename(path.with_name(path.name + ".old"))
    write_checkpoint(tmp_path, 9, {"w": torch.zeros(2)}, keep=1)  # stands in for the new copy
    checkpoint_path(tmp_path, 9).rename(path.with_name(path.name + ".tmp"))
    assert list_complete(tmp_path) == []  # listing changes nothing (a live writer may be between its renames)
    found, state = latest_checkpoint(tmp_path)  # the owner's resume puts the newer copy back
    assert found == path and torch.equal(state["w"], torch.zeros(2))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-000003"]


def test_an_old_checkpoint_half_deleted_never_looks_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import dpok.checkpoint as checkpoint

    write_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, keep=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)  # the deletion stops after the marker
    write_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, keep=1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", shutil.rmtree)
    assert [p.name for p in list_complete(tmp_path)] == ["round-000002"]


def test_a_metrics_line_cut_short_is_dropped_only_at_the_end(tmp_path: Path) -> None:
    from dpok.runlog import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2}\n{"rou')
    assert read_metrics(path) == [{"round": 1}, {"round": 2}]
    path.write_text('{"round": 1}\n{"rou\n{"round": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)


def test_the_update_statistics_keep_one_key_order_in_every_process() -> None:
    """metrics.jsonl of a resumed run (a new process, another string hash seed) is the same text as the
    uninterrupted run's: the update's statistics keep the order their keys first came in, not a set's."""
    from dpok.algorithms.base import mean_stats

    stats = [{"ratio_min": 1.0, "loss": 2.0, "skipped_steps": 1.0}, {"kl": 0.5, "loss": 4.0, "skipped_steps": 1.0}]
    assert list(mean_stats(stats)) == ["ratio_min", "loss", "skipped_steps", "kl"]
    assert mean_stats(stats) == {"ratio_min": 1.0, "loss": 3.0, "skipped_steps": 2.0, "kl": 0.5}
