"""Multi-process helpers on one process: the total batch over processes, no-op helpers, per-process seeds,
the launcher's process count."""

from __future__ import annotations

import pytest
import torch

from dpok import distributed
from dpok.config import TrainConfig


def test_samples_per_round_is_the_total_over_processes() -> None:
    cfg = TrainConfig.from_options(samples_per_round=4, sample_batch_size=4)
    cfg.validate()
    with pytest.raises(ValueError, match=r"multiple of 2 x --sample-batch-size \(4\).*total over the 2 processes"):
        cfg.validate(num_processes=2)
    TrainConfig.from_options(samples_per_round=4, sample_batch_size=2).validate(num_processes=2)
    with pytest.raises(ValueError, match=r"2 x --minibatch-size \(4\) for ddpo-is"):
        cfg = TrainConfig.from_options(algorithm="ddpo-is", samples_per_round=4, sample_batch_size=2, minibatch_size=4)
        cfg.validate(num_processes=2)


def test_one_process_helpers_are_no_ops_and_process_seeds_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("WORLD_SIZE", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.init_processes(cpu=True) is None and distributed.world_size() == 1
    model = torch.nn.Linear(2, 1)
    model(torch.ones(1, 2)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    distributed.sync_gradients(model.parameters())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    metrics = {"a": 1.0}
    assert distributed.merge_metrics(metrics) is metrics and distributed.all_sum(3) == 3
    assert distributed.rank_seed(7, 0) == 7 and len({distributed.rank_seed(7, r) for r in range(4)}) == 4
    # the launcher's own --num_processes, not the training script's options
    assert distributed.requested_processes(["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                                            "-m", "dpok", "train", "--num_processes", "5"]) == 2
    assert distributed.requested_processes(["/venv/bin/accelerate", "launch", "--num-processes=3", "train.py"]) == 3
    assert distributed.requested_processes(["python", "-m", "dpok", "train"]) == 0
    # 'accelerate launch --cpu --num_processes 2' where the launcher cannot be read: refuse, naming what works
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(ValueError, match="--multi_gpu --num_processes N"):
        distributed.init_processes(cpu=True)

