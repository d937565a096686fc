"""DPOK (Fan et al. 2023): policy gradient with a per-step KL to the pretrained model.

Per round: push every step of every valid trajectory into a replay buffer of recent transitions;
then ``gradient_steps`` optimizer steps, each accumulating ``grad_accum`` minibatches of
``minibatch_size`` transitions drawn from the buffer, on

    L = -alpha * A * clamp(rho, 1 - eps, 1 + eps) + beta * KL_t      (``surrogate="clamp"``, the paper's code)
    L = alpha * max(-A rho, -A clamp(rho, 1 - eps, 1 + eps)) + beta * KL_t   (``surrogate="ppo"``)

with rho = p_theta(x_{t-1}|x_t,z) / p_old(x_{t-1}|x_t,z) and KL_t either the closed form
||mu_theta - mu_pre||^2 / (2 sigma_t^2) (paper) or mean((eps_theta - eps_pre)^2) (official code).

The advantage A is either the paper's A = r - V_phi(x_t, z, t), with the value function V_phi
regressed by MSE onto the final reward of the transition's trajectory (``advantage="value"``), or
computed once per trajectory when it enters the buffer: the reward standardised within its
prompt's group of this round (``"group"``, GRPO) or by the prompt's reward history
(``"tracker"``, DDPO). Only the steps in the step window enter the buffer.

With several processes each keeps a replay buffer of its own transitions and draws its own
minibatches (``minibatch_size`` per process); policy and value gradients are averaged over
processes before each step, and ``normalize_advantages`` standardises over the union of the
processes' minibatches (the minibatch of that step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from .. import distributed
from ..adapter import PromptEmbeds
from ..core import PerPromptStatTracker, dpok_loss, step_kl, step_window, value_loss
from ..options import option
from ..sampling import evaluate_log_probs, policy_step
from .base import (
    ALGORITHMS,
    Algorithm,
    AlgorithmContext,
    Rollout,
    UpdateResult,
    guarded_step,
    mean_stats,
    positive,
    step_advantages,
)

if TYPE_CHECKING:
    pass


@dataclass
class DPOKSettings:
    """DPOK's own settings: the reward weight, the replay buffer and the value function."""

    title: ClassVar[str] = "DPOK (--algorithm dpok)"

    alpha: float = option(10.0, "DPOK reward weight alpha")
    buffer_size: int = option(1000, "DPOK replay buffer capacity in transitions")
    value_lr: float = option(1e-3, "DPOK value-function learning rate")
    value_steps: int = option(1, "value-function steps per policy step")
    normalize_advantages: bool = option(False, "DPOK with --advantage value: standardise r - V over the minibatch")
    surrogate: Literal["clamp", "ppo"] = option(
        "ppo", "DPOK policy term: 'clamp' (official code: clamp(rho) A, no gradient outside the band) or 'ppo' "
               "(PPO's max(-A rho, -A clamp(rho)), as DDPO-IS and GRPO)")
    value_minibatch_size: int = option(0, "DPOK: transitions per value-function step (0: --minibatch-size)")
    value_first: bool = option(False, "DPOK: train the value function before the round's policy steps (official "
                                      "code) instead of after each policy step")
    value_warmup_steps: int = option(0, "DPOK: extra value-function steps on the first round, before any policy "
                                        "step")

    def validate(self) -> list[str]:
        return (positive(self, ("alpha", "value_minibatch_size", "value_warmup_steps"))
                + positive(self, ("buffer_size", "value_steps"), least=1)
                + positive(self, ("value_lr",), strict=True))


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (N,) timesteps -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ValueFunction(nn.Module):
    """V_phi(x_t, z, t): a small CNN on the latent, the mean text state and a timestep embedding.

    latents (N, C, h, w), timesteps (N,), text (N, L, D) -> (N,) predicted final reward.
    """

    def __init__(self, latent_channels: int, text_dim: int, width: int = 64) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(latent_channels, width // 2, 3, 1, 1), nn.SiLU(),
            nn.Conv2d(width // 2, width, 3, 2, 1), nn.SiLU(),
            nn.Conv2d(width, width, 3, 2, 1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.text = nn.Linear(text_dim, width)
        self.time = nn.Linear(32, width)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(3 * width, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.image(latents.float()), self.text(text.float().mean(1)),
                       self.time(timestep_embedding(timesteps, 32))], dim=-1)
        return self.head(h).squeeze(-1)


class ReplayBuffer:
    """The most recent ``capacity`` transitions (FIFO ring), stored on the CPU.

    Fields per transition: latents, next_latents (C, h, w); timestep; old log-prob; reward;
    advantage (set when it is computed per trajectory, else 0); prompt (index into ``prompts``;
    text states are re-encoded, the encoder being frozen).
    """

    FIELDS = ("latents", "next_latents", "timesteps", "old_log_probs", "rewards", "advantages", "prompt_ids")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: dict[str, torch.Tensor] = {}
        self.prompts: list[str] = []
        self.size = 0
        self.cursor = 0

    def __len__(self) -> int:
        return self.size

    def _prompt_id(self, prompt: str) -> int:
        if prompt not in self.prompts:
            self.prompts.append(prompt)
        return self.prompts.index(prompt)

    def add(self, latents: torch.Tensor, next_latents: torch.Tensor, timesteps: torch.Tensor,
            old_log_probs: torch.Tensor, rewards: torch.Tensor, prompts: list[str],
            advantages: torch.Tensor | None = None) -> None:
        """Append N transitions (tensors with leading dim N). With N > capacity only the last
        ``capacity`` are kept: every slot is written once, so no slot mixes two transitions."""
        items = {
            "latents": latents.detach().cpu(), "next_latents": next_latents.detach().cpu(),
            "timesteps": timesteps.detach().cpu(),  # long (DDIM) or float (a flow model's 1000 t)
            "old_log_probs": old_log_probs.detach().cpu().float(),
            "rewards": rewards.detach().cpu().float(),
            "advantages": (torch.zeros_like(rewards) if advantages is None else advantages).detach().cpu().float(),
            "prompt_ids": torch.tensor([self._prompt_id(p) for p in prompts], dtype=torch.long),
        }
        if not self.data:
            self.data = {k: torch.zeros((self.capacity, *v.shape[1:]), dtype=v.dtype) for k, v in items.items()}
        n = len(items["rewards"])
        if n > self.capacity:
            # index_put with repeated indices is undefined (threads race): drop the oldest instead
            items = {k: v[n - self.capacity:] for k, v in items.items()}
            self.cursor = int((self.cursor + n - self.capacity) % self.capacity)
            n = self.capacity
        idx = (self.cursor + torch.arange(n)) % self.capacity
        for k, v in items.items():
            self.data[k][idx] = v
        self.cursor = int((self.cursor + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(0, self.size, (n,), generator=generator)
        return {k: v[idx] for k, v in self.data.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"data": dict(self.data), "prompts": list(self.prompts), "size": self.size, "cursor": self.cursor,
                "capacity": self.capacity}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.data = dict(state["data"])
        if self.data and "advantages" not in self.data:  # a checkpoint from before per-trajectory advantages
            self.data["advantages"] = torch.zeros_like(self.data["rewards"])
        self.prompts = list(state["prompts"])
        self.size, self.cursor = int(state["size"]), int(state["cursor"])


@ALGORITHMS.register
class DPOK(Algorithm):
    name = "dpok"
    # chosen by benchmarks/beta_sweep.py (docs/beta_sweep.md): its rule, fixed before the results, takes
    # the beta with the best mean judge over 4 prompts x 2 seeds; 0.01 lost a circle of `two purple
    # circles`, a prompt the base draws well, in 0.4 of the images
    default_beta = 1.0
    advantages = ("value", "group", "tracker")
    takes_shared_noise = True
    families = ("diffusion", "flow-matching")  # per-step Gaussians and their closed-form KL, either family

    def __init__(self, ctx: AlgorithmContext) -> None:
        super().__init__(ctx)
        c, _, _ = self.adapter.latent_shape
        text_dim = self.adapter.text_encoder.config.hidden_size
        self.value = ValueFunction(c, text_dim).to(self.adapter.device)
        self.value_optimizer = torch.optim.AdamW(self.value.parameters(), lr=self.cfg.dpok.value_lr)
        self.buffer = ReplayBuffer(self.cfg.dpok.buffer_size)
        self.tracker = PerPromptStatTracker(self.cfg.policy_gradient.stat_buffer,
                                            self.cfg.policy_gradient.stat_min_count,
                                            self.cfg.policy_gradient.adv_std_floor)
        self.rounds_done = 0
        self._embeds: dict[str, Any] = {}

    def _embed(self, prompt_ids: torch.Tensor):  # noqa: ANN202
        prompts = [self.buffer.prompts[i] for i in prompt_ids.tolist()]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._embeds]
        if missing:
            e = self.adapter.encode_prompts(missing)
            for i, p in enumerate(missing):
                self._embeds[p] = e[i : i + 1]
        return PromptEmbeds.cat([self._embeds[p] for p in prompts])

    def update(self, rollout: Rollout) -> UpdateResult:
        cfg, pg, own, traj = self.cfg, self.cfg.policy_gradient, self.cfg.dpok, rollout.trajectory
        traj.check_reduce(cfg.logprob_reduce)
        advantages = step_advantages(pg, self.tracker, rollout)  # (B, T)
        keep = rollout.valid.nonzero().flatten()
        # skip only when no process has a valid sample: the steps below are collectives
        if distributed.all_sum(len(keep)) == 0:
            return UpdateResult(skipped_updates=1)
        steps = step_window(traj.num_steps, pg.step_window_start, pg.step_window_end)
        t = len(steps)
        if len(keep):
            self.buffer.add(
                traj.latents[keep][:, steps].flatten(0, 1), traj.next_latents[keep][:, steps].flatten(0, 1),
                traj.timesteps[steps].repeat(len(keep)), traj.log_probs[keep][:, steps].flatten(),
                rollout.rewards[keep].repeat_interleave(t),
                [traj.prompts[i] for i in keep.tolist() for _ in range(t)],
                advantages=advantages[keep][:, steps].flatten(),
            )
        stats = []
        uses_value = pg.advantage == "value"
        if uses_value and self.rounds_done == 0:
            stats += [self._value_step() for _ in range(own.value_warmup_steps)]
        if uses_value and own.value_first:
            stats += [self._value_step() for _ in range(own.value_steps)]
        for _ in range(cfg.gradient_steps):
            stats.append(self._policy_step())
            if uses_value and not own.value_first:
                stats += [self._value_step() for _ in range(own.value_steps)]
        self.rounds_done += 1
        out = mean_stats(stats)
        out["buffer_size"] = float(len(self.buffer))
        return UpdateResult.of(out)

    def _batch(self, size: int = 0) -> dict[str, torch.Tensor]:
        mb = self.buffer.sample(size or self.cfg.minibatch_size, self.ctx.generator)
        device = self.adapter.device
        return {k: v.to(device) for k, v in mb.items()}

    def replicated_parameters(self) -> list[nn.Parameter]:
        return list(self.value.parameters())

    def _normalize(self, advantages: torch.Tensor) -> torch.Tensor:
        """Standardise advantages over the step's minibatch (every process's share of it)."""
        if distributed.world_size() == 1:
            if len(advantages) > 1:
                advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-6)
            return advantages
        count, mean, std = distributed.all_mean_std(advantages)
        return (advantages - mean) / (std + 1e-6) if count > 1 else advantages

    def _policy_step(self) -> dict[str, float]:
        cfg, pg, own, adapter = self.cfg, self.cfg.policy_gradient, self.cfg.dpok, self.adapter
        stats = []
        for _ in range(cfg.grad_accum):
            if not len(self.buffer):
                # a process whose samples were all invalid so far (several processes only) adds no
                # gradient but still takes part in the collectives of this step
                if own.normalize_advantages and pg.advantage == "value":
                    self._normalize(torch.zeros(0, device=adapter.device))
                continue
            mb = self._batch()
            embeds = self._embed(mb["prompt_ids"])
            if pg.advantage == "value":
                with torch.no_grad():
                    values = self.value(mb["latents"], mb["timesteps"], embeds.cond)
                advantages = mb["rewards"] - values
                if own.normalize_advantages:
                    advantages = self._normalize(advantages)
            else:
                advantages = mb["advantages"]
            log_probs, dist, output = evaluate_log_probs(
                adapter, mb["latents"], mb["next_latents"], mb["timesteps"], embeds, cfg.guidance_scale,
                cfg.eta, cfg.num_steps, cfg.logprob_reduce)
            with torch.no_grad():
                ref_dist, ref_output = policy_step(adapter, mb["latents"], mb["timesteps"], embeds,
                                                   cfg.guidance_scale, cfg.eta, cfg.num_steps, reference=True)
            kl = step_kl(pg.kl_form, dist, ref_dist, output, ref_output, cfg.logprob_reduce)
            loss, s = dpok_loss(log_probs, mb["old_log_probs"], advantages, kl, own.alpha, pg.beta, pg.clip_range,
                                own.surrogate)
            (loss / cfg.grad_accum).backward()
            stats.append({**s, "loss": loss.item(), "advantage_mean": float(advantages.mean())})
        out = mean_stats(stats)
        out.update(guarded_step(self.ctx.optimizer, adapter.trainable_parameters(), cfg.max_grad_norm))
        return out

    def _value_step(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        self.value_optimizer.zero_grad(set_to_none=True)
        if len(self.buffer):  # see _policy_step: an empty buffer contributes no gradient
            mb = self._batch(self.cfg.dpok.value_minibatch_size)
            embeds = self._embed(mb["prompt_ids"])
            values = self.value(mb["latents"], mb["timesteps"], embeds.cond)
            loss, stats = value_loss(values, mb["rewards"])
            loss.backward()
        step = guarded_step(self.value_optimizer, list(self.value.parameters()), 1.0)
        return {**stats, "value_grad_norm": step["grad_norm"]}

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value.state_dict(), "value_optimizer": self.value_optimizer.state_dict(),
                "buffer": self.buffer.state_dict(), "stat_tracker": self.tracker.state_dict(),
                "rounds_done": self.rounds_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value.load_state_dict(state["value"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        if "stat_tracker" in state:
            self.tracker.load_state_dict(state["stat_tracker"])
        self.rounds_done = int(state.get("rounds_done", 1))
