"""Scoring beside the sampling (``--reward-overlap``) without a model: when it is on, the order of
the scores, the errors it raises, that its worker ends with the round; and the automatic
before/after evaluation size."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from dpok.config import TrainConfig
from dpok.rewards import RewardError, RewardOutput, make_reward
from dpok.rewards.base import PromptMetadataReward
from dpok.rewards.custom import CustomReward
from dpok.scoring import THREAD_NAME, RoundScorer, overlap_enabled


def _batch(start: int, n: int = 2) -> SimpleNamespace:
    """A sampled batch as the scorer sees it: images (n, 3, 4, 4) whose pixels hold their index."""
    idx = torch.arange(start, start + n, dtype=torch.float32)
    return SimpleNamespace(images=(idx / 100).view(n, 1, 1, 1).expand(n, 3, 4, 4).clone(),
                           prompts=[f"p{i}" for i in range(start, start + n)])


def _index_reward(sleep: float = 0.0, nan_at: int = -1):  # noqa: ANN202
    """A reward scoring each image by its index (NaN at ``nan_at``), after ``sleep`` seconds; it
    records the thread of every call."""
    threads: list[str] = []

    def reward(images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        threads.append(threading.current_thread().name)
        time.sleep(sleep)
        raw = images[:, 0, 0, 0] * 100
        return RewardOutput.from_raw(torch.where(raw.round() == nan_at, torch.tensor(float("nan")), raw))

    return reward, threads


def _no_worker_alive() -> bool:
    return not any(t.name.startswith(THREAD_NAME) for t in threading.enumerate())


@pytest.mark.parametrize("overlap", [False, True])
def test_scores_come_back_in_order_with_their_invalid_mask(overlap: bool) -> None:
    reward, threads = _index_reward(nan_at=3)
    with RoundScorer(reward, overlap, round_=1) as scorer:
        for start in (0, 2, 4):
            scorer.submit(_batch(start))
        out = scorer.result()
    assert out.raw[:3].tolist() == [0, 1, 2] and out.raw[4:].tolist() == [4, 5]
    assert out.valid.tolist() == [True, True, True, False, True, True] and out.num_invalid == 1
    assert len(threads) == 3 and all(t.startswith(THREAD_NAME) == overlap for t in threads)
    assert _no_worker_alive()


def test_the_scoring_hides_behind_the_sampling() -> None:
    reward, _ = _index_reward(sleep=0.3)
    with RoundScorer(reward, True, round_=1) as scorer:
        for start in (0, 2):
            scorer.submit(_batch(start))
            time.sleep(0.3)  # "sampling" the next batch / logging the KL
        scorer.result()
    assert scorer.busy_s >= 0.55 and scorer.wait_s < 0.2, (scorer.busy_s, scorer.wait_s)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_reward_stops_with_the_same_error_in_both_modes(overlap: bool, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr("time.sleep", lambda s: None)

    def down(images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        raise RewardError("server down")

    with pytest.raises(RewardError, match="round 7: scoring failed 3 times, last: server down.*--resume"):
        with RoundScorer(down, overlap, round_=7) as scorer:
            scorer.submit(_batch(0))
            scorer.result()
    assert _no_worker_alive()


@pytest.mark.parametrize("overlap", [False, True])
def test_any_other_error_of_the_reward_surfaces_as_it_is(overlap: bool) -> None:
    calls: list[int] = []

    def second_batch_breaks(images: torch.Tensor, prompts: list[str]) -> RewardOutput:
        calls.append(len(calls))
        if len(calls) == 2:
            raise ZeroDivisionError("the user's bug")
        return RewardOutput.from_raw(torch.zeros(len(prompts)))

    with pytest.raises(ZeroDivisionError, match="the user's bug"):
        with RoundScorer(second_batch_breaks, overlap, round_=1) as scorer:
            for start in (0, 2, 4, 6):
                scorer.submit(_batch(start))
                time.sleep(0.05)  # the worker gets to the failing batch
            scorer.result()
    assert _no_worker_alive()
    assert calls[:2] == [0, 1] and len(calls) <= 4  # never a retry of a bug, never a batch scored twice


def test_the_overlap_is_on_by_default_only_where_it_can_help() -> None:
    def fn(images, prompts):  # noqa: ANN001, ANN202
        return [0.0] * len(prompts)

    custom, local = CustomReward("python:fn", fn), make_reward("jpeg-compressibility")
    http = make_reward("http", url="http://127.0.0.1:9")
    assert overlap_enabled("auto", custom, 2) and overlap_enabled("auto", http, 4)
    assert not overlap_enabled("auto", custom, 1)  # one batch: nothing to hide the scoring behind
    assert not overlap_enabled("auto", local, 4)  # a CPU reward competes with the sampling for the cores
    assert overlap_enabled("auto", make_reward("jpeg-compressibility+0.5*http", url="http://127.0.0.1:9"), 2)
    assert overlap_enabled("auto", PromptMetadataReward(custom, {}), 2)
    assert overlap_enabled("on", local, 1) and not overlap_enabled("off", http, 4)
    assert not overlap_enabled("auto", lambda images, prompts: None, 4)  # a plain callable: no claim, in line


def test_reward_overlap_is_checked_before_anything_loads() -> None:
    with pytest.raises(ValueError, match="--reward-overlap must be one of 'auto', 'on', 'off'"):
        TrainConfig.from_options(reward_overlap="sometimes").validate()
    TrainConfig.from_options(reward_overlap="on").validate()


def test_the_before_after_evaluation_is_sized_to_the_run() -> None:
    default = TrainConfig()
    assert default.eval_images == 0 and default.eval_images_for(1) == 32  # the default run: as before
    small = TrainConfig.from_options(rounds=3, samples_per_round=32)
    assert small.eval_images_for(1) == 12 and small.eval_images_for(4) == 3
    # never more than a quarter of the training samples, never below one image
    for rounds, samples, shown in [(3, 32, 1), (2, 4, 1), (1, 2, 4), (25, 32, 4), (100, 64, 2)]:
        n = TrainConfig.from_options(rounds=rounds, samples_per_round=samples).eval_images_for(shown)
        assert 1 <= n <= 32 and (n == 1 or 2 * shown * n <= rounds * samples / 4), (rounds, samples, shown, n)
    assert TrainConfig.from_options(rounds=2, samples_per_round=4, eval_images=5).eval_images_for(4) == 5
    with pytest.raises(ValueError, match="--eval-images must be >= 0"):
        TrainConfig.from_options(eval_images=-1).validate()


def test_reward_outputs_join_in_order_with_their_components() -> None:
    a = RewardOutput.from_raw(torch.tensor([1.0, float("nan")]), {"x": torch.tensor([1.0, 2.0])})
    b = RewardOutput.from_raw(torch.tensor([3.0]), {"x": torch.tensor([4.0])})
    out = RewardOutput.cat([a, b])
    assert out.scores.tolist() == [1.0, 0.0, 3.0] and out.valid.tolist() == [True, False, True]
    assert out.components["x"].tolist() == [1.0, 2.0, 4.0]
