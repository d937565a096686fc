"""Time of one training round split into sampling, reward and update, against the bare UNet
compute of the same batches (target: sampling and update each within 1.2x of bare UNet time)."""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import header, peak_memory_mb, timeit

from dpok.config import build_config
from dpok.trainer import Trainer


def bare_unet_times(trainer: Trainer) -> tuple[float, float]:
    """Bare UNet seconds for one round: sampling forwards, and DPOK's update (policy forward+backward
    plus the reference forward, on the same minibatch shapes)."""
    cfg, adapter = trainer.cfg, trainer.adapter
    unet = adapter.unet
    c, h, w = adapter.latent_shape
    cfg_mult = 2 if cfg.guidance_scale != 1.0 else 1
    emb = adapter.encode_prompts(["a green triangle"])
    b = cfg.sample_batch_size * cfg_mult
    x, t, e = torch.randn(b, c, h, w), torch.full((b,), 500), emb.cond.expand(b, -1, -1)
    with torch.no_grad():
        fwd = timeit(lambda: unet(x, t, e).sample, 3)
    sampling = fwd * cfg.num_steps * (cfg.samples_per_round // cfg.sample_batch_size)
    m = cfg.minibatch_size * cfg_mult
    xm, tm, em = torch.randn(m, c, h, w), torch.full((m,), 500), emb.cond.expand(m, -1, -1)

    def fwd_bwd() -> None:
        unet(xm, tm, em).sample.square().mean().backward()

    fb = timeit(fwd_bwd, 3)
    for p in adapter.trainable_parameters():
        p.grad = None
    with torch.no_grad(), adapter.reference():
        ref = timeit(lambda: unet(xm, tm, em).sample, 3)
    update = (fb + ref) * cfg.gradient_steps * cfg.grad_accum
    return sampling, update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--algorithm", default="dpok")
    args = parser.parse_args()
    cfg = build_config(None, {"algorithm": args.algorithm, "output_dir": "runs/benchmark-round", "eval_images": 1})
    trainer = Trainer(cfg)
    cfg = trainer.cfg  # with the automatic batch sizes filled in
    header(f"{args.algorithm} rounds: {cfg.samples_per_round} samples x {cfg.num_steps} steps, "
           f"{cfg.gradient_steps} x {cfg.grad_accum} minibatches of {cfg.minibatch_size}")
    rows = []
    for _ in range(args.rounds + 1):
        import time

        t0 = time.perf_counter()
        m = trainer.train_round()
        m["time/round_s"] = time.perf_counter() - t0
        rows.append(m)
    rows = rows[1:]  # the first round includes one-off warm-up
    med = {k: statistics.median(r[k] for r in rows) for k in ("time/sample_s", "time/reward_s", "time/update_s",
                                                             "time/round_s")}
    bare_sampling, bare_update = bare_unet_times(trainer)
    other = med["time/round_s"] - med["time/sample_s"] - med["time/reward_s"] - med["time/update_s"]
    print(f"round            {med['time/round_s']:7.2f} s")
    print(f"  sampling       {med['time/sample_s']:7.2f} s   bare UNet forwards {bare_sampling:6.2f} s   "
          f"ratio {med['time/sample_s'] / bare_sampling:4.2f}x")
    print(f"  reward         {med['time/reward_s']:7.2f} s")
    print(f"  update         {med['time/update_s']:7.2f} s   bare UNet fwd+bwd (+ref fwd) {bare_update:6.2f} s   "
          f"ratio {med['time/update_s'] / bare_update:4.2f}x")
    print(f"  logging (rollout KL) and bookkeeping {other:5.2f} s")
    print(f"peak memory: {peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
