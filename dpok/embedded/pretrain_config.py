"""The settings of ``dpok pretrain``, apart from the training code so that the command line (and
its ``--help``) reads them without loading torch or diffusers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..shapeworld import IMAGE_SIZE

STAGES = ("tokenizer", "text", "vae", "unet", "reward", "export", "report")
FLOW_STAGES = ("transformer", "export", "report")
FAMILY_STAGES = {"diffusion": STAGES, "flow-matching": FLOW_STAGES}


@dataclass
class PretrainConfig:
    """Settings of ``dpok pretrain``; the defaults made the shipped model."""

    family: str = field(default="diffusion", metadata={"help": "diffusion: the DDIM model with its UNet, text encoder, "
                                                                "VAE and reward; flow-matching: an SD3 transformer "
                                                                "on --base-model's text encoder and VAE"})
    work_dir: str = field(default="pretrain_work", metadata={"help": "folder for checkpoints and logs"})
    output_dir: str = field(default="", metadata={"help": "pipeline folder to write (default: the package's shapeworld asset)"})
    reward_output_dir: str = field(default="", metadata={"help": "reward folder to write (diffusion) or to evaluate "
                                                                 "with (flow-matching); default: the package's asset"})
    seed: int = field(default=0, metadata={"help": "seed of every random choice"})
    stages: str = field(default="", metadata={"help": f"comma-separated subset of {','.join(STAGES)} (diffusion) "
                                                      f"or {','.join(FLOW_STAGES)} (flow-matching); default: all"})
    base_model: str = field(default="", metadata={"help": "flow-matching: model folder whose tokenizer, text encoder "
                                                          "and VAE to reuse (default: the shipped shapeworld model)"})
    checkpoint_every: int = field(default=500, metadata={"help": "steps between checkpoints"})
    eval_every: int = field(default=1000, metadata={"help": "steps between quality measurements"})
    text_steps: int = field(default=1200, metadata={"help": "text encoder steps"})
    text_batch: int = field(default=256, metadata={"help": "captions per text encoder step"})
    text_lr: float = field(default=2e-3, metadata={"help": "text encoder learning rate"})
    vae_steps: int = field(default=4000, metadata={"help": "VAE steps"})
    vae_batch: int = field(default=32, metadata={"help": "crops per VAE step"})
    vae_crop: int = field(default=32, metadata={"help": "VAE training crop size (px)"})
    vae_lr: float = field(default=1e-3, metadata={"help": "VAE learning rate"})
    vae_kl_weight: float = field(default=1e-6, metadata={"help": "weight of the VAE's KL term"})
    reward_steps: int = field(default=2000, metadata={"help": "alignment reward model steps"})
    reward_batch: int = field(default=64, metadata={"help": "images per reward step"})
    reward_lr: float = field(default=1e-3, metadata={"help": "reward model learning rate"})
    reward_vae_fraction: float = field(default=0.125, metadata={"help": "share of reward images sent through the VAE"})
    latent_pool: int = field(default=60000, metadata={"help": "pretraining images encoded once for the UNet"})
    unet_steps: int = field(default=6000, metadata={"help": "UNet steps"})
    unet_batch: int = field(default=64, metadata={"help": "latents per UNet step"})
    unet_lr: float = field(default=1e-3, metadata={"help": "UNet peak learning rate (cosine decay)"})
    unet_warmup: int = field(default=300, metadata={"help": "UNet warm-up steps"})
    flow_logit_mean: float = field(default=0.0, metadata={"help": "flow-matching: mean of the logit-normal t"})
    flow_logit_std: float = field(default=1.0, metadata={"help": "flow-matching: std of the logit-normal t"})
    cfg_dropout: float = field(default=0.1, metadata={"help": "share of empty captions (for guidance)"})
    ema_decay: float = field(default=0.999, metadata={"help": "EMA decay of the UNet weights"})
    eval_images: int = field(default=4, metadata={"help": "images per prompt in periodic evaluations"})
    report_images: int = field(default=8, metadata={"help": "images per prompt in the final report"})
    report_steps: int = field(default=50, metadata={"help": "DDIM steps in the final report"})
    report_guidance: float = field(default=5.0, metadata={"help": "guidance scale in the final report"})
    grid_path: str = field(default="", metadata={"help": "PNG grid of base samples to write (report stage)"})
    max_steps_per_run: int = field(default=0, metadata={"help": "stop a stage after this many steps in this "
                                                                  "invocation (0: no limit); rerun to resume"})

    def validate(self) -> None:
        if self.family not in FAMILY_STAGES:
            raise ValueError(f"family must be one of {', '.join(FAMILY_STAGES)}, got {self.family!r}")
        valid = FAMILY_STAGES[self.family]
        bad = [s for s in self.stage_list() if s not in valid]
        if bad:
            raise ValueError(f"unknown pretraining stage(s) {bad} for family {self.family}; valid: {', '.join(valid)}")
        if self.flow_logit_std <= 0:
            raise ValueError(f"flow_logit_std must be > 0, got {self.flow_logit_std}")
        for name in ("text_steps", "vae_steps", "reward_steps", "unet_steps", "text_batch", "vae_batch",
                     "reward_batch", "unet_batch", "latent_pool", "checkpoint_every", "eval_every",
                     "eval_images", "report_images", "report_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.vae_crop % 4 or not 8 <= self.vae_crop <= IMAGE_SIZE:
            raise ValueError(f"vae_crop must be a multiple of 4 in [8, {IMAGE_SIZE}], got {self.vae_crop}")

    def stage_list(self) -> list[str]:
        """The requested stages, in the order given; all of the family's when none are given."""
        chosen = [s.strip() for s in self.stages.split(",") if s.strip()]
        return chosen or list(FAMILY_STAGES.get(self.family, STAGES))


def tiny_config(work_dir: str, family: str = "diffusion") -> PretrainConfig:
    """A few steps of every stage: for tests of the command, not for a usable model. The flow-matching
    family reuses the shipped reward (it trains none)."""
    return PretrainConfig(
        family=family, work_dir=work_dir, output_dir=str(Path(work_dir) / "export" / "model"),
        reward_output_dir=str(Path(work_dir) / "export" / "reward") if family == "diffusion" else "",
        checkpoint_every=2, eval_every=3, text_steps=3, text_batch=8, vae_steps=3, vae_batch=4, reward_steps=3,
        reward_batch=4, latent_pool=16, unet_steps=4, unet_batch=4, unet_warmup=1, eval_images=1,
        report_images=1, report_steps=2,
    )
