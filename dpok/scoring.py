"""Scoring a round's samples: one reward call per sampling batch, in line or beside the sampling.

With ``--reward-overlap on`` a worker thread scores each sampling batch while the next one is
sampled (and the last one while the rollout KL is logged): torch releases the GIL in its kernels
and a remote reward waits on its network, so the two proceed together. Both modes make the same
calls (one per sampling batch, in order, each retried the same way), so the scores, their order
and everything computed from them are identical; only the time differs. The worker lives within
one round: :class:`RoundScorer` is a context manager that joins it on exit, error or not.

The worker runs torch on one intra-op thread: its own OpenMP team would otherwise spin on the cores
the sampling uses (measured on 2 cores: the sampling took twice as long beside a worker doing a few
small tensor operations per batch). Results that depend on the number of threads (a float sum over
more than about 32k elements on the CPU may round differently in its last bit) are the only ones
that can differ from the synchronous path; elementwise operations, min / max, small reductions and
everything a server or another device computes are the same, bit for bit.

``auto`` (the default) overlaps where it can help: a reward that mostly waits or whose cost is
unknown (:attr:`~dpok.rewards.Reward.overlaps_sampling`: the HTTP reward, a user's function) and
a round of more than one sampling batch per process. A local reward on the CPU would compete with
the sampling for the same cores, and with one batch there is nothing to overlap but the KL logging.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Literal

import torch
from tqdm.auto import tqdm

from .rewards import RewardError, RewardOutput
from .sampling import Trajectory

Overlap = Literal["auto", "on", "off"]
THREAD_NAME = "dpok-reward"  # the worker's name prefix: a test checks that none outlives its round
ATTEMPTS = 3  # reward calls per batch before the run stops (a server down after its own retries)

RewardFn = Callable[[torch.Tensor, list[str]], RewardOutput]


def overlap_enabled(setting: Overlap, reward: object, batches: int) -> bool:
    """Whether a round of ``batches`` sampling batches scores beside its sampling under ``setting``."""
    if setting == "auto":
        return batches > 1 and bool(getattr(reward, "overlaps_sampling", False))
    return setting == "on"


def score_batch(reward: RewardFn, images: torch.Tensor, prompts: list[str], round_: int,
                attempts: int = ATTEMPTS) -> RewardOutput:
    """Score one batch (images (B, 3, H, W) in [0, 1], B prompts). A :class:`RewardError` (e.g. its
    server down after its own retries) scores the same samples again, never gives a made-up score;
    after ``attempts`` failures the run stops, naming ``round_`` (1-based)."""
    for attempt in range(1, attempts + 1):
        try:
            return reward(images, prompts)
        except RewardError as e:
            if attempt == attempts:
                raise RewardError(f"round {round_}: scoring failed {attempts} times, last: {e}. The run stops "
                                  "here; its last checkpoint is kept (continue with --resume)") from e
            tqdm.write(f"reward failed ({e}); scoring the same {len(prompts)} samples again")
            time.sleep(2.0 * attempt)
    raise AssertionError("unreachable")


class RoundScorer:
    """Scores the sampling batches of one round, in order: ``submit`` each batch as it is sampled,
    ``result`` the round's :class:`RewardOutput`. With ``overlap`` a single worker thread scores
    batch i while batch i+1 is sampled; without it ``result`` scores them all, one call per batch.

    ``busy_s`` is the seconds the reward calls took, ``wait_s`` those ``result`` waited for them
    (equal without overlap; with it, only the scoring the sampling did not hide)."""

    def __init__(self, reward: RewardFn, overlap: bool, round_: int, attempts: int = ATTEMPTS) -> None:
        self.reward, self.overlap, self.round, self.attempts = reward, overlap, round_, attempts
        self.busy_s = 0.0
        self.wait_s = 0.0
        self._batches: list[Trajectory] = []
        self._futures: list[Future[RewardOutput]] = []
        self._pool: ThreadPoolExecutor | None = None
        self._threads = 0
        self._lock = threading.Lock()

    def __enter__(self) -> RoundScorer:
        if self.overlap:
            self._threads = torch.get_num_threads()
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_NAME,
                                            initializer=torch.set_num_threads, initargs=(1,))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._pool is not None:  # batches not started yet are dropped; the one running is waited for
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            # the worker's one thread is also torch's default for threads started later: back to ours
            torch.set_num_threads(self._threads)

    def _score(self, batch: Trajectory) -> RewardOutput:
        t0 = time.perf_counter()
        try:
            return score_batch(self.reward, batch.images, batch.prompts, self.round, self.attempts)
        finally:
            with self._lock:
                self.busy_s += time.perf_counter() - t0

    def submit(self, batch: Trajectory) -> None:
        """One sampled batch; with overlap it starts scoring at once. A batch whose scoring already
        failed stops the round here, with that batch's error (the one the synchronous path raises)."""
        if self._pool is None:
            if self.overlap:
                raise RuntimeError("RoundScorer.submit outside its 'with' block")
            self._batches.append(batch)
            return
        for future in self._futures:
            if future.done() and future.exception() is not None:
                future.result()  # raises it
        self._futures.append(self._pool.submit(self._score, batch))

    def result(self) -> RewardOutput:
        """The round's scores, batch after batch in the order submitted (the first failing batch's
        error is raised, as the synchronous path raises it)."""
        t0 = time.perf_counter()
        try:
            outputs = ([f.result() for f in self._futures] if self.overlap
                       else [self._score(b) for b in self._batches])
        finally:
            self.wait_s = time.perf_counter() - t0
        return RewardOutput.cat(outputs)

    def timings(self) -> dict[str, float]:
        """``time/reward_s`` (waited for) and ``time/reward_busy_s`` (the reward calls), for the round's metrics."""
        return {"time/reward_s": self.wait_s, "time/reward_busy_s": self.busy_s}
