"""Entry script of tests/e2e/test_distributed.py: one DDPO-IS update on fixed rollouts, in one process
(``python tests/distributed_update.py``) or several (``accelerate launch ... tests/distributed_update.py``).

Every process builds the same LoRA and samples the same four trajectories (same seed); with N
processes, process r trains on rows [r * 4 / N, (r + 1) * 4 / N) of them, with one process on all
four. Each process writes its trainable weights after the update to ``OUT/sync-rank<r>.safetensors``,
then repeats the update from the same start with the gradient all-reduce switched off and writes
``OUT/nosync-rank<r>.safetensors``.

Why DDPO-IS with these settings makes the comparison exact up to float rounding: with
``inner_epochs=1``, ``timestep_fraction=1`` and ``minibatch_size`` = this process's whole share,
each process makes exactly one optimizer step, on the mean loss over its samples and all their
steps; the shuffling order and the per-sample step order only change the order of a sum. The mean
of the N processes' gradients is then the one-process gradient over all four samples, and the
advantages come from per-prompt statistics of the gathered rewards, as in one process. (DPOK and
RWR draw random minibatches, whose draws differ between the two set-ups.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from dpok import distributed
from dpok.adapter import DiffusionAdapter
from dpok.algorithms import ALGORITHMS, AlgorithmContext, Rollout
from dpok.algorithms import base as algorithms_base
from dpok.config import TrainConfig
from dpok.sampling import Trajectory, sample_trajectories

PROMPTS = ["a red circle", "two blue squares", "a red circle", "two blue squares"]
REWARDS = [0.2, 0.9, 0.5, 0.1]


def rows(traj: Trajectory, idx: list[int]) -> Trajectory:
    """The trajectories ``idx`` of a batch."""
    index = torch.tensor(idx)
    return Trajectory(prompts=[traj.prompts[i] for i in idx], embeds=traj.embeds[index], latents=traj.latents[index],
                      next_latents=traj.next_latents[index], timesteps=traj.timesteps, log_probs=traj.log_probs[index],
                      final_latents=traj.final_latents[index], images=traj.images[index],
                      logprob_reduce=traj.logprob_reduce)


def update_once(adapter: DiffusionAdapter, start: dict[str, torch.Tensor], cfg: TrainConfig,
                rollout: Rollout) -> dict[str, torch.Tensor]:
    """Reset the LoRA to ``start``, run one update with a fresh optimizer, return the new weights."""
    params = dict(adapter.unet.named_parameters())
    with torch.no_grad():
        for name, value in start.items():
            params[name].copy_(value)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    ctx = AlgorithmContext(cfg, adapter, optimizer, np.random.default_rng(0), torch.Generator().manual_seed(distributed.rank()))
    algorithm = ALGORITHMS.create(cfg.algorithm, ctx)
    adapter.train(True)
    algorithm.update(rollout)
    adapter.train(False)
    return {n: p.detach().clone() for n, p in adapter.unet.named_parameters() if p.requires_grad}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    distributed.init_processes(cpu=True)
    rank, n = distributed.rank(), distributed.world_size()
    share = len(PROMPTS) // n
    cfg = TrainConfig.from_options(algorithm="ddpo-is", num_steps=3, samples_per_round=len(PROMPTS), sample_batch_size=share,
                      minibatch_size=share, inner_epochs=1, timestep_fraction=1.0, learning_rate=1e-2, clip_range=0.2)
    cfg.validate(num_processes=n)
    torch.manual_seed(0)
    adapter = DiffusionAdapter.from_pretrained(args.model)
    adapter.add_lora(rank=2, alpha=2.0)
    # a non-zero LoRA "up" matrix, so that every LoRA weight gets a gradient in the first step
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.normal_(0.0, 0.1)
    start = {name: p.detach().clone() for name, p in adapter.unet.named_parameters() if p.requires_grad}
    traj = sample_trajectories(adapter, PROMPTS, cfg.num_steps, cfg.eta, cfg.guidance_scale,
                               torch.Generator().manual_seed(1), logprob_reduce=cfg.logprob_reduce)
    mine = list(range(rank * share, (rank + 1) * share))
    rollout = Rollout(rows(traj, mine), torch.tensor(REWARDS)[mine], torch.ones(share, dtype=torch.bool))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(update_once(adapter, start, cfg, rollout), out / f"sync-rank{rank}.safetensors")
    algorithms_base.sync_gradients = lambda params: None  # the same update without the all-reduce
    save_file(update_once(adapter, start, cfg, rollout), out / f"nosync-rank{rank}.safetensors")
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()
