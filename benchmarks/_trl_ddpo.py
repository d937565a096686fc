"""One run of TRL's ``DDPOTrainer`` on a diffusers pipeline folder, for ``benchmarks/vs_trl.py``.

Runs inside the separate environment that ``vs_trl.py`` builds (``trl==0.23.1``, the last release
with DDPO), never in dpok's own. The reward is dpok's, imported from the same checkout, so both
tools score with the same code. Prints one JSON line: the seconds ``train()`` took and the samples
it drew.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="diffusers StableDiffusionPipeline folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--reward", default="shapeworld-alignment")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--samples", type=int, default=16, help="samples per epoch")
    p.add_argument("--batch", type=int, default=8, help="sampling and training batch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=3e-4)
    p.add_argument("--stat-buffer", type=int, default=16)
    p.add_argument("--stat-min-count", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    warnings.filterwarnings("ignore")
    from accelerate import PartialState
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from dpok.rewards.registry import make_reward

    reward = make_reward(args.reward)

    def reward_fn(images: torch.Tensor, prompts: tuple[str, ...], metadata: tuple) -> tuple[torch.Tensor, dict]:
        # TRL hands over images in [0, 1], (B, 3, H, W), as dpok's rewards take them
        return reward(images.float().clamp(0, 1), list(prompts)).scores.cpu(), {}

    def prompt_fn() -> tuple[str, dict]:
        return args.prompt, {}

    with tempfile.TemporaryDirectory() as logdir:
        config = DDPOConfig(
            num_epochs=args.epochs, seed=args.seed, log_with=None, logdir=logdir, save_freq=10**6,
            project_kwargs={"project_dir": logdir, "logging_dir": logdir, "automatic_checkpoint_naming": True,
                            "total_limit": 1},
            mixed_precision="no", sample_num_steps=args.steps, sample_eta=args.eta,
            sample_guidance_scale=args.guidance, sample_batch_size=args.batch,
            sample_num_batches_per_epoch=args.samples // args.batch, train_batch_size=args.batch,
            train_learning_rate=args.learning_rate, train_gradient_accumulation_steps=1, train_num_inner_epochs=1,
            train_timestep_fraction=1.0, train_cfg=True, per_prompt_stat_tracking=True,
            per_prompt_stat_tracking_buffer_size=args.stat_buffer,
            per_prompt_stat_tracking_min_count=args.stat_min_count, async_reward_computation=False,
        )
        PartialState()  # TRL's pipeline logs through accelerate before its trainer creates the state
        pipeline = DefaultDDPOStableDiffusionPipeline(args.model, use_lora=True)
        trainer = DDPOTrainer(config, reward_fn, prompt_fn, pipeline)
        t_train = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t_train
    print(json.dumps({"tool": "trl", "train_s": train_s, "setup_s": t_train - t_start,
                      "samples": args.epochs * args.samples}), flush=True)


if __name__ == "__main__":
    main()
