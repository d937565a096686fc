"""Typed, validated settings of ``dpok train`` and the named presets.

Every field's ``help`` is the CLI help. ``validate()`` runs before any model is loaded. Presets
are plain functions returning overrides of the flat options: the papers' published settings and CPU-sized
settings for the embedded ShapeWorld model.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .algorithms import ALGORITHMS
from .algorithms.base import PolicyGradientSettings, largest_divisor_at_most, with_default_beta
from .algorithms.ddpo import DDPOSettings
from .algorithms.dpok import DPOKSettings
from .algorithms.nft import NFTSettings
from .algorithms.rejection import RejectionSettings
from .algorithms.supervised import SupervisedSettings
from .options import from_options, group, option, option_errors, to_options
from .rewards.config import RewardConfig

ATTENTION = "to_q,to_k,to_v,to_out.0"  # LoRA on attention only: the papers' (diffusers' attention processors)
# both streams of an MM-DiT's joint attention (SD3, FLUX)
SD3_JOINT_ATTENTION = "to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out"
# the modules Flow-GRPO's and DiffusionNFT's scripts adapt on SD3.5 (train_sd3.py, train_nft_sd3.py): the
# joint attention ``attn`` only (peft matches name suffixes: a bare ``to_q`` would also take SD3.5's
# second, image-only attention ``attn2`` of its dual-attention blocks)
SD3_PAPER_TARGETS = ",".join(f"attn.{name}" for name in SD3_JOINT_ATTENTION.split(","))

_f = option


@dataclass
class TrainConfig:
    """Settings of one fine-tuning run: the options every algorithm shares, and nested, each
    algorithm family's own (``cfg.dpok``, ``cfg.policy_gradient``, ...) and the reward's.

    From flat option names: :meth:`from_options` (or :func:`build_config` with a preset);
    :meth:`to_dict` gives them back."""

    # ---- what to fine-tune, on what
    model: str = _f("shapeworld", "diffusers pipeline folder, hub id, 'shapeworld' or 'shapeworld-flow' (the embedded models)")
    reward: RewardConfig = group(RewardConfig)
    prompt: list[str] = _f([], "a training prompt (repeatable)")
    prompt_file: str = _f("", "text file with one training prompt per line ('#' starts a comment), or a .jsonl "
                              "file of {\"prompt\": ..., other fields} objects whose fields are the prompt's "
                              "metadata, handed to rewards that take it")
    prompt_set: str = _f("", "named prompt set, e.g. hard, seen, common (see 'dpok prompts')")
    eval_prompt_set: str = _f("", "named prompt set evaluated as unseen prompts by --eval-every (optional)")
    eval_prompt: list[str] = _f([], "an unseen prompt evaluated by --eval-every (repeatable; with --eval-prompt-set: "
                                    "both)")
    algorithm: str = _f("dpok", "the method (see the groups below for each one's own options): "
                                + ", ".join(ALGORITHMS.names()))
    output_dir: str = _f("", "run folder (default: runs/<algorithm>-<time>)")
    seed: int = _f(0, "seed of prompts, noise and initialisation (with N processes, process r > 0 draws its prompts "
                      "and noise from a stream derived from (seed, r); process 0 from seed)")
    device: str = _f("auto", "'auto' (cuda if present), 'cpu' or 'cuda[:N]'")
    mixed_precision: Literal["no", "fp16", "bf16"] = _f("no", "'no', 'fp16' or 'bf16' (GPU only): dtype of the "
                                                              "frozen weights")

    # ---- policy parametrisation
    finetune: Literal["lora", "full"] = _f("lora", "'lora' (reference = adapter disabled) or 'full' (reference = "
                                                   "frozen copy)")
    lora_rank: int = _f(8, "LoRA rank")
    lora_alpha: float = _f(8.0, "LoRA alpha (scale = alpha / rank)")
    lora_targets: str = _f("to_q,to_k,to_v,to_out.0,conv1,conv2,proj_in,proj_out",
                           "comma-separated UNet module names that get LoRA (default: attention, the ResNet "
                           "convolutions and the transformer projections; 'to_q,to_k,to_v,to_out.0' is attention only, "
                           "as in the papers)")
    gradient_checkpointing: bool = _f(False, "recompute UNet activations in the backward pass (less memory, slower)")
    # ---- speed of the denoiser's calls (benchmarks/denoiser_speed.py measures each; docs/denoiser_speed.md)
    channels_last: bool = _f(False, "UNet weights and inputs in channels-last (NHWC) memory format (no effect on a "
                                    "flow model's transformer)")
    autocast: Literal["no", "bf16"] = _f("no", "run the denoiser's forward under bf16 autocast, weights kept in "
                                               "their dtype (CPUs with fast bf16, GPUs)")
    compile: bool = _f(False, "torch.compile (inductor) the denoiser; the first calls of each shape compile it")

    # ---- sampling (the policy)
    num_steps: int = _f(20, "denoising (DDIM) steps per trajectory")
    eta: float = _f(1.0, "DDIM eta (1, as in DDPO and DPOK); for flow-matching models (SD3, FLUX) the noise level a "
                            "of Flow-GRPO's SDE, default 0.7 there (its paper's) when the family is read from a local "
                            "or embedded model folder; must be > 0 for training")
    guidance_scale: float = _f(5.0, "classifier-free guidance scale w, also used for log-probs and KL")
    logprob_reduce: Literal["mean", "sum"] = _f("mean", "'mean' log-probs over latent elements (DPOK code; fits "
                                                        "clip-range 1e-4) or 'sum' (paper)")
    reward_overlap: Literal["auto", "on", "off"] = _f(
        "auto", "score each sampling batch in a worker thread while the next one is sampled: 'on', 'off', or 'auto' "
                "(on for a reward that mostly waits or costs an unknown time: --reward http, a module:function or a "
                "Python function, when a round has more than one sampling batch per process). The scores, their "
                "order and the training are the same either way; only the round's time differs")
    samples_per_prompt: int = _f(0, "k samples of each prompt per round, in a row: the groups of --advantage group "
                                    "(0: auto, gcd(8, each process's share of --samples-per-round))")

    # ---- budget
    rounds: int = _f(25, "training rounds (sample -> score -> update)")
    samples_per_round: int = _f(32, "trajectories sampled (reward queries) per round, in total: with N processes "
                                    "each samples samples-per-round / N")
    sample_batch_size: int = _f(0, "trajectories per sampling forward batch, per process (0: auto, the largest "
                                   "divisor of each process's share of --samples-per-round that is at most 32)")

    # ---- optimisation
    learning_rate: float = _f(1e-3, "policy learning rate (AdamW); the peak of --lr-schedule")
    lr_schedule: Literal["constant", "cosine", "linear"] = _f(
        "cosine", "learning-rate schedule over the rounds: 'constant', 'cosine' or 'linear' (decay towards 0 at the "
                  "last round, after the warm-up)")
    lr_warmup_rounds: int = _f(0, "rounds of linear learning-rate warm-up before the schedule (the schedule spans "
                                  "--rounds: a resume that changes --rounds re-spans the rest of it)")
    weight_decay: float = _f(1e-4, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient-norm clipping")
    minibatch_size: int = _f(0, "transitions (DPOK, SFT-KL, RWR) or samples (DDPO, GRPO) per backward pass, per "
                                "process; with N processes a step averages N minibatches (0: auto, 32 transitions, or "
                                "for DDPO and GRPO the largest divisor of each process's share of --samples-per-round "
                                "that is at most 8 for ddpo-is and grpo, as docs/tuning.md chose, 32 for ddpo-sf)")
    gradient_steps: int = _f(6, "optimizer steps per round (DPOK, SFT-KL, RWR, DiffusionNFT)")
    grad_accum: int = _f(1, "minibatches accumulated per optimizer step")

    # ---- each algorithm family's own settings
    policy_gradient: PolicyGradientSettings = group(PolicyGradientSettings)
    dpok: DPOKSettings = group(DPOKSettings)
    ddpo: DDPOSettings = group(DDPOSettings)
    nft: NFTSettings = group(NFTSettings)
    supervised: SupervisedSettings = group(SupervisedSettings)
    rejection: RejectionSettings = group(RejectionSettings)

    # ---- outputs
    eval_images: int = _f(0, "images per prompt for the before/after evaluation and grids (0: auto, sized to the "
                             "run: min(32, rounds x samples-per-round / (8 x shown prompts)), at least 1, so "
                             "that the two evaluations of up to 4 shown prompts cost at most a quarter of the "
                             "training's samples; the default run gets 32)")
    checkpoint_every: int = _f(0, "rounds between checkpoints (0: only at the end)")
    keep_checkpoints: int = _f(2, "complete checkpoints kept")
    resume: str = _f("", "run folder to continue from its newest complete checkpoint")
    report_to: list[str] = _f(["tensorboard"], "trackers of the run's scalars and image grids: tensorboard, wandb or "
                                               "none (repeatable or comma-separated; default tensorboard; wandb "
                                               "honours WANDB_MODE=offline and WANDB_PROJECT)")
    eval_every: int = _f(0, "rounds between in-training evaluations of the policy on fixed seen and unseen prompts "
                            "with fixed noise (eval/* metrics in eval.jsonl and the trackers, grids in eval/, "
                            "eval_curves.png; also before the first and after the last round; 0: none)")
    eval_every_images: int = _f(8, "images per prompt in each --eval-every evaluation (at most 4 prompts per split)")
    ema_decay: float = _f(0.0, "decay of an exponential moving average of the trainable weights, updated after every "
                               "optimizer step (0: none); evaluations use the EMA weights, saved in lora_ema/ (or "
                               "unet_ema/) beside the raw ones")
    kohya_lora: bool = _f(True, "also write the LoRA in the kohya format that ComfyUI and AUTOMATIC1111 load "
                                "(lora/lora_kohya.safetensors); 'dpok export RUN' writes it later too")
    max_bad_rounds: int = _f(5, "stop after this many rounds in a row whose update was skipped (non-finite loss, "
                                "gradient or an all-invalid reward batch)")

    GROUPS: typing.ClassVar[tuple[str, ...]] = ("reward", "policy_gradient", "dpok", "ddpo", "nft", "supervised",
                                                "rejection")

    @classmethod
    def from_options(cls, values: dict[str, Any] | None = None, **more: Any) -> TrainConfig:
        """From flat option names (``{"clip_range": 1e-3}``), the others at their defaults."""
        return from_options(cls, {**(values or {}), **more})

    def validate(self, num_processes: int = 1) -> None:
        """Check every value before any model loads; raise ValueError naming the option.

        ``num_processes``: processes of a data-parallel run, each sampling samples_per_round / N.
        """
        errors = option_errors(self)
        if self.algorithm not in ALGORITHMS.names():
            errors.append(f"--algorithm {self.algorithm!r} is unknown; valid: {', '.join(ALGORITHMS.names())}")
        else:
            errors += ALGORITHMS.get(self.algorithm).check(self, num_processes)
        for name in self.GROUPS:
            errors += getattr(self, name).validate()

        def need(cond: bool, msg: str) -> None:
            if not cond:
                errors.append(msg)

        need(self.eta > 0, f"--eta must be > 0 for training (got {self.eta}); eta = 0 has no log-prob")
        need(self.num_steps >= 1, f"--num-steps must be >= 1 (got {self.num_steps})")
        need(self.guidance_scale >= 1.0, f"--guidance-scale must be >= 1 (got {self.guidance_scale})")
        need(0 <= self.lr_warmup_rounds < max(self.rounds, 1),
             f"--lr-warmup-rounds ({self.lr_warmup_rounds}) must be >= 0 and below --rounds ({self.rounds})")
        need(self.samples_per_prompt >= 0, f"--samples-per-prompt must be >= 0 (got {self.samples_per_prompt})")
        if self.samples_per_prompt and self.samples_per_round % (num_processes * self.samples_per_prompt):
            errors.append(f"--samples-per-round ({self.samples_per_round}) must be a multiple of "
                          f"{num_processes} x --samples-per-prompt ({self.samples_per_prompt}): each process "
                          "samples whole groups")
        for name in ("sample_batch_size", "minibatch_size"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, 0 for auto (got {getattr(self, name)})")
        for name in ("rounds", "samples_per_round", "gradient_steps", "grad_accum", "lora_rank",
                     "eval_every_images", "keep_checkpoints", "max_bad_rounds"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        for name in ("learning_rate", "max_grad_norm", "lora_alpha"):
            need(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be > 0 (got {getattr(self, name)})")
        for name in ("weight_decay", "checkpoint_every", "eval_every", "eval_images"):
            need(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})")
        need(0 <= self.ema_decay < 1, f"--ema-decay must be in [0, 1), 0 for no EMA (got {self.ema_decay})")
        # samples_per_round is the round's total: each of the N processes samples an equal share, in
        # whole sampling batches (the algorithm checks its own minibatches)
        if self.sample_batch_size >= 1 and self.samples_per_round % (num_processes * self.sample_batch_size):
            times = f"{num_processes} x " if num_processes > 1 else ""
            total = f" (it is the total over the {num_processes} processes)" if num_processes > 1 else ""
            errors.append(f"--samples-per-round ({self.samples_per_round}) must be a multiple of {times}"
                          f"--sample-batch-size ({self.sample_batch_size}){total}")
        try:
            from .trackers import parse_report_to

            parse_report_to(self.report_to)
        except ValueError as e:
            errors.append(str(e))
        if self.resume and not Path(self.resume).is_dir():
            errors.append(f"--resume {self.resume!r} is not a run folder")
        if errors:
            raise ValueError("invalid settings:\n  " + "\n  ".join(errors))

    def resolved(self, num_processes: int = 1) -> TrainConfig:
        """A copy with the automatic (0) batch sizes, and the algorithm's own automatic settings,
        filled in for ``num_processes`` processes."""
        share = max(1, self.samples_per_round // num_processes)
        values: dict[str, int] = {}
        if self.sample_batch_size == 0:
            values["sample_batch_size"] = largest_divisor_at_most(share, 32)
        algorithm = ALGORITHMS.get(self.algorithm)
        if self.minibatch_size == 0:
            values["minibatch_size"] = algorithm.minibatch_default(share)
        groups = {name: dataclasses.replace(getattr(self, name), **auto)
                  for name, auto in algorithm.auto_settings(self).items()}
        return with_default_beta(dataclasses.replace(self, **values, **groups))

    def eval_images_for(self, shown_prompts: int) -> int:
        """``--eval-images``, or for 0 (auto) the images per prompt that keep the before and after
        evaluations of ``shown_prompts`` prompts (2 x shown x images samples) within a quarter of the
        run's training samples (rounds x samples_per_round), capped at 32 and at least 1."""
        if self.eval_images:
            return self.eval_images
        return max(1, min(32, self.rounds * self.samples_per_round // (8 * max(1, shown_prompts))))

    def group_size(self, num_processes: int = 1) -> int:
        """k, the samples of one prompt drawn together in a round (on one process)."""
        if self.samples_per_prompt:
            return self.samples_per_prompt
        return math.gcd(8, self.samples_per_round // num_processes)

    def to_dict(self) -> dict[str, Any]:
        """The flat options (the names the CLI, config files and ``config.json`` use)."""
        return to_options(self)


# ------------------------------------------------------------------------------------- presets

def preset_shapeworld_cpu() -> dict[str, Any]:
    """The defaults: the embedded model on a 2-core CPU in under 10 minutes on the slower kind of
    machine (AVX2 only). 20 DDIM steps (eta 1, guidance 5), 25 rounds of 32 samples (groups of 8 per
    prompt), 6 gradient steps of 32 transitions from the replay buffer, advantages standardised within
    each prompt's group of the round, PPO's clipped surrogate at clip 1e-3 on log-probs averaged over
    latent elements (the DPOK code's scale), the first 75 % of the denoising steps trained, LoRA rank
    8 on attention, ResNet convolutions and transformer projections at lr 1e-3 decayed by a cosine
    over the rounds. Chosen by the sweep of docs/tuning.md (``benchmarks/tune.py``): its
    screening and the confirmation of the screening's best two on 256 images. The KL weight beta 1
    (DPOK's own default, ``--beta -1``) was chosen after it by ``benchmarks/beta_sweep.py``
    (docs/beta_sweep.md) over 4 prompts and 2 seeds."""
    return {}


def preset_dpok_paper() -> dict[str, Any]:
    """DPOK, SD v1.5 + ImageReward, single prompt. Sources: the paper (Fan et al. 2023, Sec. 5 and
    App.) and where it is silent or differs the official code (google-research/dpok,
    train_online_pg.py defaults):

    - alpha 10, beta 0.01, lr 1e-5, 10 samples per round, 5 gradient steps of 12 accumulated
      minibatches of 4 transitions, buffer 1000, ratio clamp 1e-4, grad-norm clip 0.1, value lr
      1e-4, 50 DDIM steps at eta 1, guidance 7.5, LoRA rank 4, 20,000 samples (2000 rounds): paper;
    - KL as mean((eps_theta - eps_pre)^2): the code's form, for which beta 0.01 was chosen (in
      closed form the same beta weighs the last step ~60 times the median step);
    - value function trained first in each round, one AdamW step on 5 x 256 transitions (here one
      minibatch of 1280), AdamW weight decay 0, log-probs averaged over latent elements: code;
    - advantage r - V and the clamped ratio (no PPO min/max): paper and code;
    - a constant learning rate: paper and code.
    """
    return dict(algorithm="dpok", alpha=10.0, beta=0.01, learning_rate=1e-5, logprob_reduce="mean", samples_per_round=10,
                sample_batch_size=10, gradient_steps=5, grad_accum=12, minibatch_size=4, buffer_size=1000,
                clip_range=1e-4, max_grad_norm=0.1, value_lr=1e-4, rounds=2000, num_steps=50, eta=1.0,
                guidance_scale=7.5, lora_rank=4, lora_alpha=4.0, lora_targets=ATTENTION, kl_form="epsilon",
                reward="image-reward",
                weight_decay=0.0, value_minibatch_size=1280, value_steps=1, value_first=True, advantage="value",
                surrogate="clamp", step_window_start=0.0, step_window_end=1.0, samples_per_prompt=10,
                lr_schedule="constant")


def preset_dpok_paper_multi() -> dict[str, Any]:
    """DPOK's multi-prompt setting (paper, Sec. 5.2): alpha = 1000, beta = 0.1; one sample per prompt."""
    return {**preset_dpok_paper(), "alpha": 1000.0, "beta": 0.1, "samples_per_prompt": 1}


def preset_ddpo_paper() -> dict[str, Any]:
    """DDPO-IS with LoRA on the aesthetic reward (Black et al. 2023; ddpo-pytorch config/dgx.py,
    ``aesthetic()`` on top of ``compressibility()`` and base.py): 8 GPUs x 4 sampling batches of 8 =
    256 samples per epoch, 200 epochs; training batches of 4 per GPU with 4 accumulation steps,
    i.e. 2 optimizer steps per epoch (here: minibatches of 4, 32 accumulated); one inner epoch; lr
    3e-4 (constant), AdamW weight decay 1e-4, clip range 1e-4, advantages clipped to 5, per-prompt stat
    tracking with a buffer of 32 and min count 16, 50 DDIM steps at eta 1, guidance 5, every
    timestep trained, grad-norm clip 1, log-probs averaged over latent elements."""
    return dict(algorithm="ddpo-is", learning_rate=3e-4, weight_decay=1e-4, samples_per_round=256, sample_batch_size=16,
                minibatch_size=4, inner_epochs=1, grad_accum=32, clip_range=1e-4, adv_clip=5.0,
                stat_buffer=32, stat_min_count=16, num_steps=50, eta=1.0, guidance_scale=5.0,
                max_grad_norm=1.0, rounds=200, reward="aesthetic", advantage="tracker", timestep_fraction=1.0,
                logprob_reduce="mean", step_window_start=0.0, step_window_end=1.0, lora_rank=4, lora_alpha=4.0,
                lora_targets=ATTENTION, lr_schedule="constant")


def preset_sft_kl_paper() -> dict[str, Any]:
    """DPOK's supervised baseline (paper, Sec. 5 and App.): gamma 2 (chosen from 0.1, 1, 2, 5), lr 2e-5 (constant),
    batch 128, 50 DDIM steps, guidance 7.5, ImageReward; the conditional prediction is trained, as
    in the paper."""
    return dict(algorithm="sft-kl", gamma=2.0, learning_rate=2e-5, minibatch_size=128, num_steps=50,
                guidance_scale=7.5, reward="image-reward", supervised_target="conditional", lora_rank=4,
                lora_alpha=4.0, lora_targets=ATTENTION, lr_schedule="constant")


def preset_flow_grpo_paper() -> dict[str, Any]:
    """Flow-GRPO on GenEval (Liu et al. 2025; yifan123/flow_grpo config/grpo.py ``geneval_sd3`` on
    config/base.py, scripts/train_sd3.py). Its SDE noise level 0.7 is ``--eta`` on a flow-matching
    model (SD3, FLUX; read from a local folder's model_index.json, else give ``--eta 0.7``); a
    DDIM-family model takes eta 1:

    - 48 groups of 24 images per epoch (1152 samples), two optimizer steps per epoch (here minibatches
      of 9 samples, 64 accumulated), one inner epoch, 10 sampling steps (40 for evaluation),
      guidance 4.5, timestep fraction 0.99 (Flow-GRPO's int() trains 9 of the 10 steps; the
      rounding here trains all 10), beta 0.04 on the per-step KL,
      ratio clip 1e-4, advantages clipped to 5, lr 3e-4 constant, AdamW weight decay 1e-4,
      grad-norm clip 1, EMA of the weights at decay 0.9: the config files;
    - group advantages divided by the std of the whole epoch's rewards (``sample.global_std``): the
      config files;
    - LoRA rank 32, alpha 64, on attention (on a flow-matching model both streams of the joint
      attention ``attn``, the script's target modules); log-probs averaged over latent elements: the
      script.
    """
    return dict(algorithm="grpo", advantage="group", samples_per_prompt=24, samples_per_round=1152,
                minibatch_size=9, grad_accum=64, inner_epochs=1, num_steps=10, guidance_scale=4.5, eta=1.0,
                timestep_fraction=0.99, step_window_start=0.0, step_window_end=1.0, beta=0.04, kl_form="closed-form",
                clip_range=1e-4, adv_clip=5.0, learning_rate=3e-4, lr_schedule="constant", weight_decay=1e-4,
                max_grad_norm=1.0, ema_decay=0.9, lora_rank=32, lora_alpha=64.0, lora_targets=ATTENTION,
                logprob_reduce="mean", adv_global_std=True, flow_overrides={"eta": 0.7, "lora_targets": SD3_PAPER_TARGETS})


def preset_diffusion_nft_paper() -> dict[str, Any]:
    """DiffusionNFT on GenEval (Zheng et al. 2025; NVlabs/DiffusionNFT config/nft.py ``sd3_geneval`` on
    config/base.py, scripts/train_nft_sd3.py):

    - beta 1, the sampling policy's decay min(0.001 x step, 0.5) (``decay_type`` 1), CFG-free
      (guidance 1, the conditional prediction trained), deterministic rollouts with 10 steps (40 for
      evaluation), 48 groups of 24 images per epoch with one optimizer step (here minibatches of
      9 samples, 128 accumulated), KL weight 1e-4 on mean((v_theta - v_ref)^2), advantages clipped
      to 5 after dividing by the std of all the epoch's rewards (``sample.global_std``), lr 3e-4
      constant, AdamW weight decay 1e-4, grad-norm clip 1, EMA at decay 0.9: the config files and
      the script;
    - LoRA rank 32, alpha 64, on attention (on a flow-matching model both streams of the joint
      attention ``attn``); each sample of the epoch trained once, in a random order, at 9 of its sampler's
      10 timesteps (``int(10 x timestep_fraction 0.99)``, a random order per sample, fresh noise each):
      the script;
    - rollouts by DPM-Solver++(2M) (``sample.solver`` "dpm2"): the config files (their rollouts
      round SD3's timesteps 1000 t to integers; here they stay as the schedule has them).
    Evaluation samples with eta 1 (DDIM), where the authors evaluate with the Euler ODE (their solver
    "flow", deterministic) at 40 steps.
    """
    return dict(algorithm="diffusion-nft", advantage="group", samples_per_prompt=24, samples_per_round=1152,
                minibatch_size=9, grad_accum=128, gradient_steps=1, nft_beta=1.0, nft_decay_rate=0.001,
                nft_decay_max=0.5, guidance_scale=1.0, supervised_target="conditional", rollout_eta=0.0,
                rollout_steps=10, num_steps=40, beta=1e-4, adv_clip=5.0, learning_rate=3e-4, lr_schedule="constant",
                weight_decay=1e-4, max_grad_norm=1.0, ema_decay=0.9, lora_rank=32, lora_alpha=64.0,
                lora_targets=ATTENTION, adv_global_std=True, minibatch_draw="shuffled", nft_train_steps=9,
                rollout_solver="dpm-solver++",
                flow_overrides={"lora_targets": SD3_PAPER_TARGETS})


PRESETS: dict[str, Callable[[], dict[str, Any]]] = {
    "shapeworld-cpu": preset_shapeworld_cpu,
    "dpok-paper": preset_dpok_paper,
    "dpok-paper-multi": preset_dpok_paper_multi,
    "ddpo-paper": preset_ddpo_paper,
    "sft-kl-paper": preset_sft_kl_paper,
    "flow-grpo-paper": preset_flow_grpo_paper,
    "diffusion-nft-paper": preset_diffusion_nft_paper,
}


# defaults that differ on flow-matching models (the family read from a local model folder): DDIM's
# eta = 1 has no meaning there, and Flow-GRPO's SDE noise level is 0.7
# and a transformer has no convolutions: LoRA goes on both streams of its joint attention, the
# modules Flow-GRPO adapts on SD3 (the default's conv names would leave the text stream frozen)
FLOW_DEFAULTS: dict[str, Any] = {"eta": 0.7,
                                 "lora_targets": SD3_JOINT_ATTENTION}


def model_family_of(model: str) -> str | None:
    """The family of a local model folder (None for a hub id or a missing folder)."""
    from .adapter import local_model_family

    return local_model_family(model)


def build_config(preset: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Defaults, then the preset, then the user's options; validated."""
    values: dict[str, Any] = {}
    family = model_family_of(overrides.get("model", TrainConfig.model))
    if family == "flow-matching":
        values.update(FLOW_DEFAULTS)
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"--preset {preset!r} is unknown; valid: {', '.join(PRESETS)}")
        preset_values = PRESETS[preset]()
        # a preset's settings for flow-matching models (the family read from a local model folder)
        flow_values = preset_values.pop("flow_overrides", {})
        values.update(preset_values)
        if flow_values and family == "flow-matching":
            values.update(flow_values)
    values.update(overrides)
    cfg = TrainConfig.from_options(values)
    cfg.validate()
    return cfg
