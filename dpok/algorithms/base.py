"""What every algorithm shares: the rollout record, the registry, the guarded optimizer step."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch

from ..adapter import DiffusionAdapter, local_model_family
from ..core import PerPromptStatTracker, clip_advantages, group_advantages, trunk_advantages
from ..distributed import gather_batch, sync_gradients
from ..options import option
from ..sampling import Trajectory, sample_in_batches

if TYPE_CHECKING:  # the config nests every algorithm's settings: it imports this package
    from ..config import TrainConfig

Advantage = Literal["value", "group", "tracker"]


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest d <= limit that divides n (n >= 1)."""
    return next(d for d in range(min(n, limit), 0, -1) if n % d == 0)


@dataclass
class PolicyGradientSettings:
    """Settings of the policy-gradient methods (their KL, ratio clip, advantages and trained steps)."""

    title: ClassVar[str] = "policy gradient (dpok, ddpo-sf, ddpo-is, grpo; advantages and beta also diffusion-nft)"

    beta: float = option(-1.0, "KL weight beta of DPOK, GRPO (per-step KL, --kl-form) and DiffusionNFT (eps-form KL "
                               "to the pretrained model); 0 turns KL regularisation off; -1: the algorithm's own "
                               "default (dpok 1, chosen by benchmarks/beta_sweep.py, docs/beta_sweep.md; grpo and "
                               "diffusion-nft 0.01)")
    kl_form: Literal["closed-form", "epsilon"] = option(
        "closed-form", "'closed-form' ||mu-mu_pre||^2/(2 sigma^2) (paper) or 'epsilon' (official code)")
    clip_range: float = option(1e-3, "ratio clip epsilon (DPOK clamp, DDPO-IS and GRPO PPO clip)")
    advantage: Advantage = option(
        "group", "advantage estimator: 'value' (DPOK: r - V_phi(x_t, z, t)), 'group' (GRPO: reward standardised within "
                 "its prompt's group of this round), 'tracker' (DDPO: per-prompt history of --stat-buffer rewards)")
    adv_clip: float = option(5.0, "advantage clip (DDPO, GRPO; DiffusionNFT maps [-clip, clip] onto its optimality "
                                  "[0, 1])")
    adv_std_floor: float = option(0.0, "smallest reward std the 'group' and 'tracker' advantages divide by (reward "
                                       "units; 0: none): rewards that barely differ, all near 0 on a prompt the model "
                                       "cannot draw yet, then give small advantages instead of unit-scale noise")
    shared_noise: bool = option(False, "the k samples of each prompt's group of a round (--samples-per-prompt) start "
                                       "from one initial noise x_T, and --advantage group standardises within each "
                                       "such group (DanceGRPO): the spread of rewards that x_T alone decides leaves "
                                       "the advantages, which then credit the steps' noise, what the policy chooses")
    branch_step: int = option(0, "with --shared-noise, each group's k samples also share their first s denoising "
                                 "steps and branch there (a tree rollout): the shared steps are credited with the "
                                 "group's mean reward against the prompt's other groups, each sample's later steps "
                                 "with its reward against its own group (0: branch at x_T)")
    adv_global_std: bool = option(False, "'group' advantages divide by the std of every reward of the round instead "
                                         "of each group's own (global_std of the Flow-GRPO and DiffusionNFT code): "
                                         "a group whose rewards barely differ keeps small advantages")
    stat_buffer: int = option(16, "per-prompt reward history length (DDPO stat tracking)")
    stat_min_count: int = option(16, "rewards of a prompt needed before its own statistics are used")
    step_window_start: float = option(0.0, "first trained step, as a fraction of the trajectory (0 = the noisiest "
                                           "step)")
    step_window_end: float = option(0.75, "end of the trained steps, as a fraction (0.75 leaves out the final, "
                                          "low-noise quarter of the steps)")

    def validate(self) -> list[str]:
        errors = []
        if not 0 <= self.step_window_start < self.step_window_end <= 1:
            errors.append(f"--step-window-start ({self.step_window_start}) and --step-window-end "
                          f"({self.step_window_end}) must satisfy 0 <= start < end <= 1")
        if self.stat_min_count > self.stat_buffer:
            errors.append(f"--stat-min-count ({self.stat_min_count}) must be <= --stat-buffer ({self.stat_buffer})")
        errors += positive(self, ("clip_range", "adv_clip"), strict=True)
        errors += positive(self, ("stat_buffer", "stat_min_count"), least=1)
        errors += positive(self, ("adv_std_floor", "branch_step"))
        if not (self.beta >= 0 or self.beta == -1):
            errors.append(f"--beta must be >= 0, or -1 for the algorithm's own default (got {self.beta})")
        return errors


def positive(settings: Any, names: tuple[str, ...], *, strict: bool = False, least: int | None = None) -> list[str]:
    """Errors for the named settings that are not > 0 (``strict``), >= ``least``, or else >= 0."""
    errors = []
    for name in names:
        value = getattr(settings, name)
        flag = "--" + name.replace("_", "-")
        if least is not None and value < least:
            errors.append(f"{flag} must be >= {least} (got {value})")
        elif least is None and strict and not value > 0:
            errors.append(f"{flag} must be > 0 (got {value})")
        elif least is None and not strict and not value >= 0:
            errors.append(f"{flag} must be >= 0 (got {value})")
    return errors


@dataclass
class Rollout:
    """One round's samples and their rewards.

    ``rewards`` (B,) are the reward's scores with non-finite ones stored as 0; ``valid`` (B,) is
    False for those, and every algorithm leaves invalid samples out of its update.
    """

    trajectory: Trajectory
    rewards: torch.Tensor
    valid: torch.Tensor
    groups: list[str] | None = None  # a key per sample naming its advantage group (default: its prompt)

    @property
    def prompts(self) -> list[str]:
        return self.trajectory.prompts

    @property
    def advantage_groups(self) -> list[str]:
        """The key of each sample's group for --advantage group: its prompt, or its group of one
        initial noise with --shared-noise."""
        return self.groups if self.groups is not None else self.trajectory.prompts


def with_default_beta(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``--beta -1`` replaced by its algorithm's own default (:attr:`Algorithm.default_beta`)."""
    pg = cfg.policy_gradient
    if pg.beta >= 0:
        return cfg
    beta = ALGORITHMS.get(cfg.algorithm).default_beta
    return dataclasses.replace(cfg, policy_gradient=dataclasses.replace(pg, beta=beta))


@dataclass
class AlgorithmContext:
    """What an algorithm may use: settings, model, optimizer and its random generators."""

    cfg: TrainConfig
    adapter: DiffusionAdapter
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator
    generator: torch.Generator
    reward: Callable[..., Any] | None = None


@dataclass
class UpdateResult:
    """What one round's update did: its statistics (the ``train/*`` metrics) and what it skipped.

    ``skipped_steps``: optimizer steps left out for a non-finite gradient (None: the update takes
    no optimizer steps); ``skipped_updates``: 1 when the whole update was left out (no valid sample
    on any process)."""

    stats: dict[str, float] = field(default_factory=dict)
    skipped_steps: int | None = None
    skipped_updates: int = 0

    @property
    def skipped(self) -> bool:
        return bool(self.skipped_steps or self.skipped_updates)

    def metrics(self) -> dict[str, float]:
        """The stats with the skip counters, as logged."""
        out = dict(self.stats)
        if self.skipped_steps is not None:
            out["skipped_steps"] = float(self.skipped_steps)
        if self.skipped_updates:
            out["skipped_updates"] = float(self.skipped_updates)
        return out

    @classmethod
    def of(cls, stats: dict[str, float]) -> UpdateResult:
        """From a stats dict holding the counters of :func:`guarded_step` / :func:`mean_stats`."""
        rest = {k: v for k, v in stats.items() if k not in ("skipped_steps", "skipped_updates")}
        steps = int(stats["skipped_steps"]) if "skipped_steps" in stats else None
        return cls(rest, steps, int(stats.get("skipped_updates", 0)))


class Algorithm:
    """Base class. Subclasses set ``name`` and implement :meth:`update`.

    Class attributes the settings are checked against before any model loads (:meth:`check`):
    ``advantages``, the estimators it takes; ``sample_minibatches``, whether its minibatches are
    whole samples (all their trained steps) rather than transitions; ``families``, the model
    families it is defined for."""

    name: ClassVar[str] = ""
    trains: ClassVar[bool] = True
    samples_from_reference: ClassVar[bool] = False  # SFT-KL learns from the pretrained model's samples
    advantages: ClassVar[tuple[str, ...]] = ("group", "tracker")
    sample_minibatches: ClassVar[bool] = False
    families: ClassVar[tuple[str, ...]] = ("diffusion",)  # see dpok.adapter.model_family
    own_rollout_sampler: ClassVar[bool] = False  # samples its rounds with --rollout-steps / --rollout-eta
    takes_shared_noise: ClassVar[bool] = False  # its advantages come from trajectory_advantages (--shared-noise)
    reads_ddpo_settings: ClassVar[bool] = False  # whether --inner-epochs and --timestep-fraction change what it does
    # --beta -1 (the default) means this: the KL weight of the algorithms that read one, and the value
    # recorded for the others (the shared option's earlier default, so their recorded settings stay as they were)
    default_beta: ClassVar[float] = 0.01

    @classmethod
    def check(cls, cfg: TrainConfig, num_processes: int) -> list[str]:
        """Errors of ``cfg`` for this algorithm (each names the option), before any model loads."""
        errors = []
        advantage = cfg.policy_gradient.advantage
        if advantage not in cls.advantages:
            errors.append(f"--advantage {advantage} is not one --algorithm {cls.name} takes (valid: "
                          f"{', '.join(cls.advantages)})")
        nft = cfg.nft
        if not cls.own_rollout_sampler and (nft.rollout_steps, nft.rollout_eta, nft.rollout_solver,
                                            nft.nft_train_steps) != (0, -1.0, "ddim", 0):
            errors.append(f"--rollout-steps, --rollout-eta, --rollout-solver and --nft-train-steps are DiffusionNFT's; "
                          f"{cls.name} trains on the steps it samples (set --num-steps and --eta)")
        family = local_model_family(cfg.model)
        if family is not None and family not in cls.families:
            errors.append(f"--algorithm {cls.name} is not defined for {family} models (--model {cfg.model}); it "
                          f"trains {', '.join(cls.families)} models")
        errors += cls._check_shared_noise(cfg, num_processes)
        minibatch = cfg.minibatch_size
        if cls.sample_minibatches and minibatch >= 1 and cfg.samples_per_round % (num_processes * minibatch):
            times = f"{num_processes} x " if num_processes > 1 else ""
            total = f" (it is the total over the {num_processes} processes)" if num_processes > 1 else ""
            errors.append(f"--samples-per-round ({cfg.samples_per_round}) must be a multiple of {times}--minibatch-size "
                          f"({minibatch}) for {cls.name}{total}")
        return errors

    @classmethod
    def _check_shared_noise(cls, cfg: TrainConfig, num_processes: int) -> list[str]:
        """Errors of --shared-noise: it needs group advantages, groups of two or more and stochastic
        rollouts; and of --branch-step: it needs --shared-noise, per-step credit and a step to branch at."""
        branch = cfg.policy_gradient.branch_step
        if branch and not cfg.policy_gradient.shared_noise:
            return [f"--branch-step {branch} needs --shared-noise: the samples that branch from one trunk are a "
                    "group of --samples-per-prompt samples sharing their x_T"]
        if branch and cls.own_rollout_sampler:
            return [f"--branch-step is for the methods that credit each denoising step, not --algorithm {cls.name}, "
                    "which trains on the final images"]
        if branch >= cfg.num_steps:
            return [f"--branch-step ({branch}) must be below --num-steps ({cfg.num_steps})"]
        if not cfg.policy_gradient.shared_noise:
            return []
        if not cls.takes_shared_noise:
            return [f"--shared-noise is for the methods with group advantages (dpok, ddpo-sf, ddpo-is, grpo, "
                    f"diffusion-nft), not --algorithm {cls.name}"]
        errors = []
        if cfg.policy_gradient.advantage != "group":
            errors.append(f"--shared-noise needs --advantage group (got {cfg.policy_gradient.advantage}): only "
                          "advantages standardised within each group of one x_T leave out what x_T decides")
        if cfg.group_size(num_processes) < 2:
            errors.append(f"--shared-noise needs groups of at least 2 samples of a prompt per process (got "
                          f"{cfg.group_size(num_processes)}, from --samples-per-prompt or, at 0, from each process's "
                          "share of --samples-per-round): raise --samples-per-prompt")
        if cls.own_rollout_sampler and cfg.nft.rollout_eta == 0:
            errors.append("--shared-noise with --rollout-eta 0: deterministic rollouts from one x_T are all the same "
                          "image (use --rollout-eta > 0)")
        return errors

    @classmethod
    def minibatch_default(cls, share: int) -> int:
        """The automatic --minibatch-size for a process's ``share`` of the round's samples."""
        return largest_divisor_at_most(share, 32) if cls.sample_minibatches else 32

    @classmethod
    def auto_settings(cls, cfg: TrainConfig) -> dict[str, Any]:
        """Values for this algorithm's own settings left at 0 (auto): ``{group: {name: value}}``."""
        return {}

    def __init__(self, ctx: AlgorithmContext) -> None:
        self.ctx = ctx
        # a context built from settings that were never resolved (a test, a script) still gets the
        # algorithm's own KL weight, never the sentinel -1
        self.cfg = with_default_beta(ctx.cfg)
        self.adapter = ctx.adapter

    def update(self, rollout: Rollout) -> UpdateResult:
        raise NotImplementedError

    def sampling_policy(self) -> contextlib.AbstractContextManager[None]:
        """The weights the round's samples are drawn with (default: the trained ones)."""
        return contextlib.nullcontext()

    def rollout_sampler(self) -> tuple[int, float]:
        """(steps, eta) of the round's sampler: the training sampler, whose steps are trained on."""
        return self.cfg.num_steps, self.cfg.eta

    def rollout_solver(self) -> str:
        """The round's solver (:data:`dpok.sampling.SOLVERS`): the policy's own step."""
        return "ddim"

    def generate(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Images (B, 3, H, W) the method produces for ``prompts`` (evaluation and grids)."""
        cfg = self.cfg
        traj = sample_in_batches(self.adapter, prompts, cfg.sample_batch_size, cfg.num_steps, cfg.eta,
                                 cfg.guidance_scale, generator)
        return traj.images

    def reward_queries_per_image(self) -> int:
        return 1

    def replicated_parameters(self) -> list[torch.nn.Parameter]:
        """Trained parameters of the algorithm's own (besides the policy's), e.g. DPOK's value
        function: in a multi-process run they start from the main process's values and their
        gradients are averaged like the policy's, so every process keeps the same copy."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class AlgorithmRegistry:
    """Algorithms by name; the trainer never branches on a name."""

    def __init__(self) -> None:
        self._classes: dict[str, type[Algorithm]] = {}

    def register(self, cls: type[Algorithm]) -> type[Algorithm]:
        self._classes[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type[Algorithm]:
        if name not in self._classes:
            raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(self.names())}")
        return self._classes[name]

    def create(self, name: str, ctx: AlgorithmContext) -> Algorithm:
        return self.get(name)(ctx)


ALGORITHMS = AlgorithmRegistry()


def guarded_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_grad_norm: float,
                 scale: float = 1.0) -> dict[str, float]:
    """Clip and apply the accumulated gradients, unless they are not finite.

    A non-finite gradient norm skips the step and clears the gradients, leaving the weights
    bitwise unchanged (``skipped`` = 1). ``grad_norm`` is the norm before clipping.

    In a multi-process run the gradients are first averaged over processes (every process calls
    this the same number of times); the norm, and so the skip decision, is then the same on all.
    """
    params = list(params)
    sync_gradients(params)
    if scale != 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale)
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm, "skipped_steps": 1.0}
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm": norm, "skipped_steps": 0.0}


def trajectory_advantages(estimator: str, tracker: PerPromptStatTracker, prompts: list[str], rewards: torch.Tensor,
                          valid: torch.Tensor, clip: float, std_floor: float = 0.0,
                          groups: list[str] | None = None, global_std: bool = False) -> torch.Tensor:
    """One advantage per trajectory (B,) for ``estimator`` 'group' or 'tracker', clipped to +-``clip``;
    zeros for 'value' (computed per transition by DPOK's value function instead).

    The statistics see every process's rewards (one process: this batch), so every process keeps
    the same tracker state and a group split over processes is still one group. Invalid samples
    get 0 and enter no statistic. ``std_floor``: the group's (the tracker has its own). ``groups``:
    the key of each sample's group for 'group' (default: its prompt; :attr:`Rollout.advantage_groups`);
    the tracker keeps its history per prompt either way. ``global_std``: 'group' divides by the std of
    every process's rewards of this round (:func:`dpok.core.group_advantages`).
    """
    if estimator == "value":
        return torch.zeros_like(rewards, dtype=torch.float32)
    masked = torch.where(valid, rewards, torch.full_like(rewards, float("nan")))
    keys = groups if (estimator == "group" and groups is not None) else prompts
    all_keys, all_rewards, mine = gather_batch(keys, masked)
    if estimator == "group":
        advantages = group_advantages(all_keys, all_rewards, std_floor=std_floor, global_std=global_std)
    else:
        advantages = tracker.update(all_keys, all_rewards)
    return clip_advantages(advantages, clip)[mine]


def step_advantages(pg: PolicyGradientSettings, tracker: PerPromptStatTracker, rollout: Rollout) -> torch.Tensor:
    """The advantage of every step of every trajectory (B, T), clipped to +-``adv_clip``.

    Every step gets its trajectory's advantage (:func:`trajectory_advantages`), except with
    --branch-step s: the first s steps, shared by a group's trajectories, get the group's trunk
    advantage (:func:`dpok.core.trunk_advantages`, over every process's rewards) and the later
    steps the trajectory's advantage within its group. Invalid samples get 0 throughout.
    """
    traj = rollout.trajectory
    per_trajectory = trajectory_advantages(pg.advantage, tracker, traj.prompts, rollout.rewards, rollout.valid,
                                           pg.adv_clip, pg.adv_std_floor, rollout.advantage_groups,
                                           pg.adv_global_std)
    out = per_trajectory[:, None].repeat(1, traj.num_steps)
    if pg.branch_step:
        masked = torch.where(rollout.valid, rollout.rewards, torch.full_like(rollout.rewards, float("nan")))
        all_groups, all_rewards, mine = gather_batch(rollout.advantage_groups, masked)
        all_prompts, _, _ = gather_batch(traj.prompts, masked)
        trunk = clip_advantages(trunk_advantages(all_prompts, all_groups, all_rewards, std_floor=pg.adv_std_floor),
                                pg.adv_clip)[mine]
        out[:, : pg.branch_step] = trunk.to(out)[:, None]
    return out


def mean_stats(items: list[dict[str, float]]) -> dict[str, float]:
    """Average each key over a list of stats dicts (sums for counters named ``skipped_*``)."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for d in items for k in d):  # first-seen order: a set's order changes per process
        values = [d[key] for d in items if key in d]
        out[key] = float(np.sum(values)) if key.startswith("skipped") else float(np.mean(values))
    return out
