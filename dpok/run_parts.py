"""The parts of one training run, built in one place: :func:`build_run` -> :class:`RunParts`.

The trainer receives them and runs the loop; a test or a notebook can build them (or replace one)
and hand them to :class:`dpok.trainer.Trainer`. Building is ordered so that a run is reproducible:
every process seeds the same global RNGs before the weights are created (identical LoRA and
value-function weights everywhere), then draws its own prompt and noise streams.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .adapter import DiffusionAdapter
from .algorithms import ALGORITHMS, Algorithm, AlgorithmContext
from .config import TrainConfig
from .domains import Domain, model_domain, reward_domain
from .ema import PolicyEMA
from .prompts import FunctionPromptSampler, PromptFunction, PromptSampler, prompt_metadata, resolve_prompts
from .rewards import Reward
from .rewards.base import PromptMetadataReward
from .runtime import seed_everything, select_device

GRID_PROMPTS = 4  # prompts shown in the before/after grids
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class RunParts:
    """Everything a run is made of, for one process of it.

    ``cfg`` is the resolved config (automatic batch sizes filled in); ``prompts`` the training
    prompts (with ``prompt_fn``, the fixed ones of the grids and evaluations); ``eval_unseen`` the
    held-out evaluation prompts; ``generator`` (torch, CPU) and ``rng`` (numpy) this process's
    noise and prompt streams; ``sampler`` draws the training prompts of each round.
    """

    cfg: TrainConfig
    rank: int
    num_processes: int
    domain: Domain | None
    prompt_metadata: dict[str, dict[str, Any]]
    prompt_fn: PromptFunction | None
    prompts: list[str]
    eval_unseen: list[str]
    device: torch.device
    reward: Reward
    out: Path
    adapter: DiffusionAdapter
    optimizer: torch.optim.Optimizer
    ema: PolicyEMA | None
    generator: torch.Generator
    rng: np.random.Generator
    algorithm: Algorithm
    sampler: PromptSampler | FunctionPromptSampler

    @property
    def is_main(self) -> bool:
        """Process 0: the one that evaluates and writes the run's files."""
        return self.rank == 0

    def evaluated_weights(self) -> contextlib.AbstractContextManager[None]:
        """The weights evaluations use: the EMA ones with --ema-decay (within the block), else the raw ones."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def replicated_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters every process holds the same copy of: the policy's trainable ones and the algorithm's."""
        return self.adapter.trainable_parameters() + self.algorithm.replicated_parameters()


def prepare_prompts(cfg: TrainConfig, domain: Domain | None, defaults: tuple[str, ...] = ()) -> list[str]:
    """Training prompts: the ones given (checked by ``domain``), else ``defaults``, the model's
    domain's (on the embedded model ``two white triangles``)."""
    if not (cfg.prompt or cfg.prompt_file or cfg.prompt_set):
        if not defaults:
            raise ValueError("give training prompts with --prompt, --prompt-file or --prompt-set")
        return list(defaults)
    return resolve_prompts(cfg.prompt or None, cfg.prompt_file or None, cfg.prompt_set or None, domain)


def default_output_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_folder(cfg: TrainConfig) -> Path:
    """The run folder: ``--resume``'s, else ``--output-dir``, else a new one under ``runs/``; a fresh
    run refuses a folder that already holds one."""
    out = Path(cfg.resume or cfg.output_dir) if (cfg.resume or cfg.output_dir) else default_output_dir(cfg)
    if not cfg.resume and (out / "config.json").exists():
        raise ValueError(f"--output-dir {out} already holds a run (config.json); continue it with "
                         f"--resume {out} or choose another --output-dir (nothing was changed)")
    return out


def build_policy(cfg: TrainConfig, device: torch.device, pipeline: Any = None) -> DiffusionAdapter:
    """The model to train: ``pipeline`` (changed in place) or ``cfg.model``, with LoRA or all UNet
    weights trainable, in ``--mixed-precision``'s dtype."""
    dtype = DTYPES[cfg.mixed_precision]
    if dtype != torch.float32 and device.type == "cpu":
        raise ValueError("--mixed-precision fp16/bf16 needs a GPU; use --mixed-precision no on the CPU")
    adapter = (DiffusionAdapter.from_pipeline(pipeline, device, dtype) if pipeline is not None
               else DiffusionAdapter.from_pretrained(cfg.model, device, dtype))
    if cfg.finetune == "lora":
        adapter.add_lora(cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets.split(",")))
    else:
        adapter.enable_full_finetuning()
    if cfg.gradient_checkpointing:
        adapter.unet.enable_gradient_checkpointing()
    adapter.set_speed(cfg.channels_last, cfg.autocast, cfg.compile)
    return adapter


def build_run(cfg: TrainConfig, *, pipeline: Any = None, reward: Reward | None = None,
              prompt_fn: PromptFunction | None = None) -> RunParts:
    """Validate ``cfg`` and build every part of its run on this process (the run folder is created
    last, so a model that fails to load leaves no empty folder).

    ``pipeline``, ``reward`` and ``prompt_fn`` replace ``cfg.model``, ``cfg.reward`` and the
    configured prompts (see :class:`dpok.trainer.Trainer`)."""
    state = distributed.init_processes(cpu=cfg.device == "cpu" or not torch.cuda.is_available())
    rank, num_processes = distributed.rank(), distributed.world_size()
    cfg.validate(num_processes=num_processes)
    auto = [n for n in ("sample_batch_size", "minibatch_size") if getattr(cfg, n) == 0]
    auto_own = ALGORITHMS.get(cfg.algorithm).auto_settings(cfg)
    own_beta = cfg.policy_gradient.beta < 0  # --beta -1: the algorithm's own KL weight
    cfg = cfg.resolved(num_processes)
    if (auto or auto_own or own_beta) and rank == 0:
        shown = [f"--{n.replace('_', '-')} {getattr(cfg, n)}" for n in auto]
        shown += [f"--{n.replace('_', '-')} {v}" for values in auto_own.values() for n, v in values.items()]
        shown += [f"--beta {cfg.policy_gradient.beta:g}"] if own_beta else []
        tqdm.write("settings (auto): " + ", ".join(shown))
    # the model's domain gives default prompts; a domain reward's checks the prompts on any model
    own = model_domain(cfg.model)
    domain = own or reward_domain(cfg.reward.name)
    # prompt -> metadata (a .jsonl prompt file's fields, or what prompt_fn returns), for the rewards that take it
    metadata: dict[str, dict[str, Any]] = prompt_metadata(cfg.prompt_file, domain) if cfg.prompt_file else {}
    if prompt_fn is None:
        prompts = prepare_prompts(cfg, domain, own.default_prompts if own else ())
    else:  # the fixed prompts of the grids and evaluations, drawn once from their own stream
        prompts = FunctionPromptSampler(prompt_fn, cfg.seed, metadata).preview(GRID_PROMPTS)
    # --eval-images 0 (auto): sized to the run and the prompts its grids show
    cfg = dataclasses.replace(cfg, eval_images=cfg.eval_images_for(min(len(prompts), GRID_PROMPTS)))
    eval_unseen = (resolve_prompts(cfg.eval_prompt or None, None, cfg.eval_prompt_set or None, domain)
                   if cfg.eval_prompt or cfg.eval_prompt_set else [])
    device = select_device(cfg.device)
    if state is not None and device.type == "cuda":
        device = state.device  # one GPU per process: cuda:<local rank>
    reward = reward.to(device) if reward is not None else cfg.reward.build(device)
    if reward.uses_metadata:  # handed each prompt's metadata wherever it is called
        reward = PromptMetadataReward(reward, metadata)
    reward.validate_prompts(prompts + eval_unseen)
    out = run_folder(cfg)
    # every process has checked the folder before the main one writes config.json into it
    distributed.barrier()
    # the same seed everywhere first: every process builds identical LoRA / value-function weights
    seed_everything(cfg.seed)
    adapter = build_policy(cfg, device, pipeline)
    params = adapter.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # the EMA of the trainable weights, stepped after every optimizer step (--ema-decay)
    ema = PolicyEMA(params, cfg.ema_decay, optimizer) if cfg.ema_decay else None
    # each process its own prompt and noise streams (process 0: the run's seed, as with one process)
    seed = distributed.rank_seed(cfg.seed, rank)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    algorithm = ALGORITHMS.create(cfg.algorithm, AlgorithmContext(cfg, adapter, optimizer, rng, generator, reward))
    sampler = (PromptSampler(prompts, seed) if prompt_fn is None
               else FunctionPromptSampler(prompt_fn, seed, metadata))
    if rank > 0:
        seed_everything(seed)  # the global RNGs too, now that the shared weights are built
    parts = RunParts(cfg, rank, num_processes, domain, metadata, prompt_fn, prompts, eval_unseen, device, reward,
                     out, adapter, optimizer, ema, generator, rng, algorithm, sampler)
    distributed.broadcast_parameters(parts.replicated_parameters())
    out.mkdir(parents=True, exist_ok=True)  # only now: a model that fails to load leaves no empty run folder
    return parts
