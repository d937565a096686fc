"""Training hands each prompt of a JSON Lines prompt file its metadata (on a tiny random pipeline)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from dpok.cli import main

LINES = [{"prompt": "a red circle", "colour": "red", "count": 1},
         {"prompt": "two blue squares", "colour": "blue", "count": 2, "tags": ["count"]}]


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


REWARD_MODULE = '''
import torch

CALLS = []


def score(images, prompts, metadata):
    CALLS.append((list(prompts), [dict(m) for m in metadata]))
    return torch.tensor([float(m["count"]) for m in metadata]) + images.mean(dim=(1, 2, 3))
'''


def test_training_hands_each_prompt_its_metadata(tiny_pipeline_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "metareward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = _jsonl(tmp_path / "prompts.jsonl", LINES)
    assert main(["train", "--model", str(tiny_pipeline_dir), "--prompt-file", str(prompts), "--reward",
                 "metareward:score", "--rounds", "1", "--samples-per-round", "4", "--num-steps", "2",
                 "--eval-images", "1", "--gradient-steps", "1", "--report-to", "none",
                 "--output-dir", str(tmp_path / "run")]) == 0
    calls = sys.modules["metareward"].CALLS
    assert len(calls) == 5  # before and after (one call per prompt), the round
    expected = {row["prompt"]: {k: v for k, v in row.items() if k != "prompt"} for row in LINES}
    for batch, metadata in calls:
        assert metadata == [expected[p] for p in batch]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["reward_before"]["two blue squares"] > 1.5  # count 2 (+ a mean pixel below 1)

