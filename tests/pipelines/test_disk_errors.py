"""A full disk (ENOSPC) or a read-only run folder while checkpointing or saving: the previous
checkpoint stays complete and loadable, the error names the folder and what to free, the exit code
is not 0, and the run continues with --resume once there is room."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dpok.utils.state_io as state_io
from dpok.checkpoint import latest_checkpoint, list_complete, write_checkpoint
from dpok.cli import main
from dpok.utils.diskwrite import RunFolderWriteError


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """Tiny models train faster on one thread (no thread hand-offs on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _full(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _read_only(path: object) -> OSError:
    return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


def _failing_save_file(make_error):  # noqa: ANN001, ANN202
    """A safetensors writer that writes part of the file, then fails as the disk would."""
    def save_file(tensors: dict, path: Path) -> None:
        Path(path).write_bytes(b"partial safetensors")
        raise make_error(path)
    return save_file


@pytest.mark.parametrize("make_error,words", [(_full, "Free at least"), (_read_only, "not writable")])
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_says_what_to_do(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_error, words: str) -> None:  # noqa: ANN001
    write_checkpoint(tmp_path, 1, {"w": torch.ones(1000), "round": 1}, keep=1)
    monkeypatch.setattr(state_io, "save_file", _failing_save_file(make_error))
    with pytest.raises(RunFolderWriteError) as info:
        write_checkpoint(tmp_path, 2, {"w": torch.zeros(1000), "round": 2}, keep=1)
    message = str(info.value)
    assert str(tmp_path) in message and words in message and "round-000002" in message
    assert "round-000001" in message and f"dpok train --resume {tmp_path}" in message
    if make_error is _full:
        assert "KiB" in message  # how much a checkpoint takes: what to free
    assert info.value.errno == make_error("x").errno and info.value.folder == tmp_path
    path, state = latest_checkpoint(tmp_path)
    assert path.name == "round-000001" and state["round"] == 1 and torch.equal(state["w"], torch.ones(1000))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["round-000001"]  # no partial copy left


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="chmod does not stop root from writing")
def test_a_read_only_checkpoint_folder_is_named(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 1, {"w": torch.ones(3)}, keep=2)
    folder = tmp_path / "checkpoints"
    folder.chmod(0o555)
    try:
        with pytest.raises(RunFolderWriteError, match="not writable.*chmod"):
            write_checkpoint(tmp_path, 2, {"w": torch.zeros(3)}, keep=2)
    finally:
        folder.chmod(0o755)
    assert [p.name for p in list_complete(tmp_path)] == ["round-000001"]


def _argv(pipeline: Path, reward: Path, out: Path) -> list[str]:
    return ["train", "--model", str(pipeline), "--alignment-model", str(reward), "--prompt", "a red circle",
            "--rounds", "3", "--samples-per-round", "2", "--sample-batch-size", "2", "--minibatch-size", "2",
            "--gradient-steps", "1", "--num-steps", "2", "--eval-images", "1", "--checkpoint-every", "1",
            "--device", "cpu", "--output-dir", str(out)]


@pytest.fixture(scope="module")
def straight_run(tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("disk") / "straight"
    assert main(_argv(tiny_pipeline_dir, tiny_reward_dir, out)) == 0
    return out


def _same_result(a: Path, b: Path) -> None:
    la, lb = (load_file(d / "lora" / "pytorch_lora_weights.safetensors") for d in (a, b))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)

    def rows(d: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert rows(a) == rows(b)


def test_disk_full_at_the_final_save_exits_non_zero_then_resume_finishes(
        tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path: Path, straight_run: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from dpok.adapter import DiffusionAdapter

    real = DiffusionAdapter.save_lora

    def save_lora_on_a_full_disk(self, folder: Path) -> Path:  # noqa: ANN001
        path = real(self, folder)
        path.write_bytes(path.read_bytes()[:100])  # the write stopped part-way
        raise _full(path)

    run = tmp_path / "run"
    monkeypatch.setattr(DiffusionAdapter, "save_lora", save_lora_on_a_full_disk)
    assert main(_argv(tiny_pipeline_dir, tiny_reward_dir, run)) == 2
    err = capsys.readouterr().err
    assert f"into {run}" in err and "No space left" in err and "Free at least" in err
    assert "round-000003" in err and f"dpok train --resume {run}" in err
    path, state = latest_checkpoint(run)  # the final checkpoint is complete and loads
    assert path.name == "round-000003" and state["round"] == 3
    assert not (run / "summary.json").exists()
    monkeypatch.setattr(DiffusionAdapter, "save_lora", real)  # space freed
    assert main(["train", "--resume", str(run)]) == 0
    _same_result(straight_run, run)


def test_disk_full_at_a_checkpoint_mid_run_then_resume_is_bit_identical(
        tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path: Path, straight_run: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = state_io.save_file
    calls = []

    def save_file(tensors: dict, path: Path) -> None:
        calls.append(path)
        if len(calls) == 2:  # the checkpoint of round 2
            _failing_save_file(_full)(tensors, path)
        real(tensors, path)

    run = tmp_path / "run"
    monkeypatch.setattr(state_io, "save_file", save_file)
    assert main(_argv(tiny_pipeline_dir, tiny_reward_dir, run)) == 2
    err = capsys.readouterr().err
    assert "checkpoint round-000002" in err and str(run) in err and "round-000001" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["round-000001"]
    assert latest_checkpoint(run)[1]["round"] == 1
    monkeypatch.setattr(state_io, "save_file", real)
    assert main(["train", "--resume", str(run)]) == 0
    _same_result(straight_run, run)


@pytest.mark.parametrize("full_at", [1, 3])  # 1: before the first checkpoint, the resume starts the run over
def test_disk_full_while_logging_metrics_leaves_a_resumable_run(
        tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path: Path, straight_run: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], full_at: int) -> None:
    from dpok.runlog import RunLog

    real = RunLog.write

    def write(self, round_: int, metrics: dict) -> None:  # noqa: ANN001
        if round_ == full_at:  # half a line, then the disk is full
            with open(self.path, "a") as f:
                f.write(json.dumps({"round": round_, **metrics})[:40])
            raise _full(self.path)
        real(self, round_, metrics)

    run = tmp_path / "run"
    monkeypatch.setattr(RunLog, "write", write)
    assert main(_argv(tiny_pipeline_dir, tiny_reward_dir, run)) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    monkeypatch.setattr(RunLog, "write", real)
    assert main(["train", "--resume", str(run)]) == 0  # the half line is dropped, its round runs again
    _same_result(straight_run, run)


def test_read_only_run_folder_at_the_final_save(tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from dpok.adapter import DiffusionAdapter

    def read_only(self, folder: Path) -> Path:  # noqa: ANN001
        raise _read_only(Path(folder) / "pytorch_lora_weights.safetensors")

    run = tmp_path / "run"
    monkeypatch.setattr(DiffusionAdapter, "save_lora", read_only)
    assert main(_argv(tiny_pipeline_dir, tiny_reward_dir, run)) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and f"chmod -R u+w {run}" in err and "round-000003" in err
    assert latest_checkpoint(run)[1]["round"] == 3


def test_a_run_stopped_between_its_two_config_files_is_whole_on_the_next_try(
        tiny_pipeline_dir: Path, tiny_reward_dir: Path, tmp_path: Path, straight_run: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """config.yaml is written before config.json (the mark of a run): stopped between them, the same
    command runs again; a run folder missing its config.yaml (older versions wrote it second) gets it
    back on --resume."""
    import dpok.outputs as outputs

    def stopped(path: Path, text: str) -> None:
        raise KeyboardInterrupt  # the process dies before config.json is written

    run = tmp_path / "run"
    monkeypatch.setattr(outputs, "write_text_atomic", stopped)
    assert main(_argv(tiny_pipeline_dir, tiny_reward_dir, run)) == 130
    assert (run / "config.yaml").is_file() and not (run / "config.json").exists()
    monkeypatch.undo()
    assert main(_argv(tiny_pipeline_dir, tiny_reward_dir, run)) == 0
    _same_result(straight_run, run)
    assert json.loads((run / "config.json").read_text())["rounds"] == 3
    (run / "config.yaml").unlink()
    assert main(["train", "--resume", str(run), "--rounds", "4"]) == 0
    assert "rounds: 4" in (run / "config.yaml").read_text()
