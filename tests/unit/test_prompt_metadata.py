"""JSON Lines prompt files with metadata, handed to the rewards that take it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpok.prompts import PromptFileError, load_prompt_file, load_prompt_records, prompt_metadata
from dpok.rewards.base import PromptMetadataReward, RewardError, WeightedSum
from dpok.rewards.custom import CustomReward
from dpok.shapeworld.domain import DOMAIN as SHAPEWORLD

LINES = [{"prompt": "a red circle", "colour": "red", "count": 1},
         {"prompt": "two blue squares", "colour": "blue", "count": 2, "tags": ["count"]}]


def _jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    return path


def test_jsonl_prompt_files_give_prompts_and_their_metadata(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", LINES)
    assert load_prompt_records(path) == [("a red circle", {"colour": "red", "count": 1}),
                                         ("two blue squares", {"colour": "blue", "count": 2, "tags": ["count"]})]
    assert load_prompt_file(path, SHAPEWORLD) == ["a red circle", "two blue squares"]
    assert prompt_metadata(path)["two blue squares"]["count"] == 2
    text = tmp_path / "p.txt"
    text.write_text("a red circle\n")
    assert load_prompt_records(text) == [("a red circle", {})] and prompt_metadata(text) == {}


@pytest.mark.parametrize(("rows", "expected"), [
    ([LINES[0], "not json {"], "line 2: not a JSON object"),
    ([LINES[0], {"text": "a red circle"}], 'line 2: each line must be a JSON object with a non-empty "prompt"'),
    ([LINES[0], ["a", "list"]], "line 2: each line must be a JSON object"),
    ([LINES[0], {"prompt": "three blue dogs"}], "line 2"),  # outside the ShapeWorld grammar
    ([LINES[0], {**LINES[0], "colour": "green"}], "'a red circle' appears twice with different metadata"),
])
def test_bad_jsonl_lines_name_the_file_and_line(tmp_path: Path, rows: list[object], expected: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    with pytest.raises(PromptFileError) as e:
        prompt_metadata(path, SHAPEWORLD)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_rewards_that_take_metadata_get_it_and_others_do_not() -> None:
    images, prompts = torch.rand(2, 3, 4, 4), ["a", "b"]
    seen: list[list[dict]] = []

    def with_meta(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> list[float]:
        seen.append(metadata)
        return [float(m.get("count", 0)) for m in metadata]

    def without(images: torch.Tensor, prompts: list[str]) -> list[float]:
        return [1.0] * len(prompts)

    meta_reward, plain = CustomReward("m", with_meta), CustomReward("p", without)
    assert meta_reward.uses_metadata and not plain.uses_metadata
    assert meta_reward(images, prompts, [{"count": 3}, {}]).scores.tolist() == [3.0, 0.0]
    assert meta_reward(images, prompts).scores.tolist() == [0.0, 0.0]  # no metadata: empty dicts
    both = WeightedSum([(1.0, meta_reward), (2.0, plain)], "m+2*p")
    assert both.uses_metadata and both(images, prompts, [{"count": 1}, {"count": 2}]).scores.tolist() == [3.0, 4.0]
    looked_up = PromptMetadataReward(meta_reward, {"a": {"count": 5}})
    assert looked_up(images, prompts).scores.tolist() == [5.0, 0.0]
    assert seen[-1] == [{"count": 5}, {}]
    with pytest.raises(RewardError, match="metadata for 1 prompts, not 2"):
        meta_reward(images, prompts, [{}])




