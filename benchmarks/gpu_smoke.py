"""GPU smoke test: a few DPOK rounds with LoRA in fp16 on a local Stable Diffusion folder.

    python benchmarks/gpu_smoke.py --model /path/to/stable-diffusion-v1-5 [--reward jpeg-compressibility]

Prints samples/s of sampling and of whole rounds, and the peak GPU memory. Needs a CUDA GPU; the
reward defaults to JPEG compressibility so that no reward weights are needed.
"""

from __future__ import annotations

import argparse
import time

import torch

from dpok.config import build_config
from dpok.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="local Stable Diffusion pipeline folder")
    parser.add_argument("--reward", default="jpeg-compressibility")
    parser.add_argument("--prompt", default="a photo of a cat")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples-per-round", type=int, default=8)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--output-dir", default="runs/gpu-smoke")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_smoke needs a CUDA GPU")
    cfg = build_config("dpok-paper", {
        "model": args.model, "reward": args.reward, "prompt": [args.prompt], "rounds": args.rounds,
        "samples_per_round": args.samples_per_round, "sample_batch_size": args.samples_per_round,
        "num_steps": args.num_steps, "mixed_precision": "fp16", "device": "cuda", "eval_images": 2,
        "output_dir": args.output_dir, "gradient_checkpointing": True,
    })
    trainer = Trainer(cfg)
    torch.cuda.reset_peak_memory_stats()
    for r in range(cfg.rounds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = trainer.train_round()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"round {r + 1}: {cfg.samples_per_round / m['time/sample_s']:.2f} samples/s sampling, "
              f"{cfg.samples_per_round / dt:.2f} samples/s per round ({dt:.1f} s: sample {m['time/sample_s']:.1f}, "
              f"update {m['time/update_s']:.1f}), reward {m['reward/mean']:.3f}, KL {m['kl/rollout']:.3f}")
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
