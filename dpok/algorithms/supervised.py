"""Supervised baselines on denoising losses: SFT with KL (DPOK's baseline), RWR and sparse RWR.

All three train eps_theta(x_t, t, z) on x_0 latents of sampled images, with fresh noise at a
uniform timestep (the pretraining objective), weighted by reward:

- ``sft-kl``: data from the *pretrained* model, gathered round by round at the same reward-query
  budget as the online methods, loss  E[w ||eps - eps_theta||^2] + gamma E[||eps_pre - eps_theta||^2]
  with w = r - min(0, min r) (the rewards, shifted up when some are negative so that every
  weight is >= 0 and the loss is bounded below: with ImageReward's negative scores the raw
  weights would reward moving *away* from those samples without limit);
- ``rwr``: data from the current model (this round), weights softmax(r / T) * N;
- ``rwr-sparse``: weight 1 for samples at or above the round's ``rwr_percentile`` reward, else 0.

The training data are samples of the guided sampler (guidance w). ``supervised_target="guided"``
(default) fits the guided prediction eps_u + w (eps_c - eps_u), the very quantity that samples, so
guidance does not compound round after round. Its own samples are still not an exact fixed point
(a guided prediction is not the score of the distribution it samples, and the sampler's steps are
finite): at lr 1e-3 with LoRA rank 8, sparse RWR on its own best half collapsed to reward 0 within
6 rounds (docs/tuning.md, exploration runs).
``"conditional"`` fits eps_c alone, as the published baselines do; sampling again with guidance w
then sharpens the already-guided distribution once more every round, and RWR's on-policy loop
compounds it (the collapse measured in docs/results.md).

With several processes each keeps its own samples and draws its own minibatches; the weights
(softmax, percentile) are computed over every process's rewards and gradients are averaged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from .. import distributed
from ..adapter import PromptEmbeds
from ..core import flow_forward, flow_velocity_target, rwr_loss, rwr_sparse_weights, rwr_weights, sft_kl_loss, sft_weights
from ..options import option
from .base import ALGORITHMS, Algorithm, AlgorithmContext, Rollout, UpdateResult, guarded_step, mean_stats, positive


@dataclass
class SupervisedSettings:
    """Settings of the reward-weighted denoising methods."""

    title: ClassVar[str] = "supervised baselines (sft-kl, rwr, rwr-sparse; --supervised-target also diffusion-nft)"

    gamma: float = option(2.0, "SFT-KL weight gamma of the KL bound")
    supervised_target: Literal["guided", "conditional"] = option(
        "guided", "SFT-KL / RWR: which prediction is trained on the (guided) samples: 'guided' (eps_u + w (eps_c - "
                  "eps_u), the one that samples; no compounding of guidance) or 'conditional' (eps_c alone, as the "
                  "DPOK/DDPO baselines)")
    minibatch_draw: Literal["with-replacement", "shuffled"] = option(
        "with-replacement", "SFT-KL / RWR / DiffusionNFT: how the update's minibatches are drawn from the data: "
                            "'with-replacement' (independent draws) or 'shuffled' (the data in a random order, "
                            "each sample once before any repeats, as DiffusionNFT's code)")
    rwr_temperature: float = option(0.2, "RWR temperature (weights ~ exp(r / T))")
    rwr_percentile: float = option(50.0, "sparse RWR keeps samples at or above this reward percentile")

    def validate(self) -> list[str]:
        errors = positive(self, ("gamma",)) + positive(self, ("rwr_temperature",), strict=True)
        if not 0 <= self.rwr_percentile < 100:
            errors.append(f"--rwr-percentile must be in [0, 100) (got {self.rwr_percentile})")
        return errors


class MinibatchDraw:
    """Indices (B,) of successive minibatches of ``size`` from ``n`` samples.

    With replacement: each minibatch ``size`` independent uniform draws. Shuffled: the samples in a
    random order, a new permutation when one runs out, so every sample is drawn once before any is
    drawn twice (with replacement, a round of n draws leaves about (1 - 1/n)^n ~ 37 % unused).
    """

    def __init__(self, n: int, size: int, shuffled: bool, generator: torch.Generator) -> None:
        self.n, self.size, self.shuffled, self.generator = n, size, shuffled, generator
        self._order = torch.zeros(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if not self.shuffled:
            return torch.randint(0, self.n, (self.size,), generator=self.generator)
        while len(self._order) < self.size:
            self._order = torch.cat([self._order, torch.randperm(self.n, generator=self.generator)])
        idx, self._order = self._order[: self.size], self._order[self.size:]
        return idx


def denoising_target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor,
                     alphas_cumprod_t: torch.Tensor | None) -> torch.Tensor:
    """What the network should output: eps, v = sqrt(abar) eps - sqrt(1 - abar) x0, or a flow
    model's velocity eps - x0 (which needs no ``alphas_cumprod_t``)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "flow":
        return flow_velocity_target(x0, noise)
    if prediction_type == "v_prediction":
        a = alphas_cumprod_t.view(-1, *[1] * (x0.dim() - 1))
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"unsupported prediction type {prediction_type!r} for denoising losses")


class _Supervised(Algorithm):
    # denoising losses on freshly noised samples: either family's forward process (see _noised)
    families = ("diffusion", "flow-matching")

    def __init__(self, ctx: AlgorithmContext) -> None:
        super().__init__(ctx)
        self.data: dict[str, Any] = {"x0": [], "cond": [], "rewards": []}

    def _append(self, rollout: Rollout) -> None:
        keep = rollout.valid.nonzero().flatten()
        traj = rollout.trajectory
        embeds = traj.embeds[keep.to(traj.embeds.cond.device)]
        self.data["x0"].append(traj.final_latents[keep].cpu())
        self.data["cond"].append(embeds.cond.cpu())
        self.data["rewards"].append(rollout.rewards[keep].cpu())
        # SDXL, SD3 and FLUX: the pooled text embeddings (and SDXL's time ids) condition the network too
        for name in ("pooled", "time_ids"):
            if getattr(embeds, name) is not None:
                self.data.setdefault(name, []).append(getattr(embeds, name).cpu())

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.cat(self.data[k]) for k in ("x0", "cond", "rewards"))  # type: ignore[return-value]

    def _embeds(self, idx: torch.Tensor, cond_all: torch.Tensor, uncond: PromptEmbeds) -> PromptEmbeds:
        """The conditioning of the samples ``idx`` (the unconditional fields from the empty prompt)."""
        device = self.adapter.device
        extra = {}
        if self.data.get("pooled"):
            extra = {"pooled": torch.cat(self.data["pooled"])[idx].to(device),
                     "uncond_pooled": uncond.uncond_pooled.expand(len(idx), -1)}
        if self.data.get("time_ids"):
            extra["time_ids"] = torch.cat(self.data["time_ids"])[idx].to(device)
        return PromptEmbeds(cond_all[idx].to(device), uncond.uncond.expand(len(idx), -1, -1), **extra)

    def _weights(self, rewards: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _prediction(self, latents: torch.Tensor, timesteps: torch.Tensor, embeds: PromptEmbeds,
                    reference: bool = False) -> torch.Tensor:
        """The trained prediction (``supervised_target``) of the policy, or of the pretrained model."""
        # "conditional": the unguided eps, guidance scale 1
        scale = self.cfg.guidance_scale if self.cfg.supervised.supervised_target == "guided" else 1.0
        return self.adapter.noise_pred(latents, timesteps, embeds, scale, reference=reference)

    def _loss(self, pred, target, latents, timesteps, embeds, weights):  # noqa: ANN001, ANN202
        return rwr_loss(pred, target, weights)

    def _sample_weights(self, rewards: torch.Tensor) -> torch.Tensor:
        """Weights (N,) of this process's samples, normalised over the data of every process."""
        _, every_reward, mine = distributed.gather_batch([""] * len(rewards), rewards)
        return self._weights(every_reward)[mine]

    def _step_loss(self, x0: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor, timesteps: torch.Tensor,
                   embeds: PromptEmbeds, weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one minibatch: x_0 (B, C, h, w) noised with ``noise`` into ``latents`` at ``timesteps``."""
        pred = self._prediction(latents, timesteps, embeds).float()
        abar = None if self.adapter.is_flow else self.adapter.alphas_cumprod[timesteps]
        target = denoising_target(self.adapter.prediction_type, x0.float(), noise.float(), abar)
        return self._loss(pred, target, latents, timesteps, embeds, weights)

    def update(self, rollout: Rollout) -> UpdateResult:
        self._append(rollout)
        x0_all, cond_all, rewards_all = self._tensors()
        # skip only when no process has data: the optimizer steps below are collectives
        if distributed.all_sum(len(x0_all)) == 0:
            return UpdateResult(skipped_updates=1)
        weights_all = self._sample_weights(rewards_all)
        cfg, adapter, gen = self.cfg, self.adapter, self.ctx.generator
        device = adapter.device
        uncond = adapter.encode_prompts([""])
        stats = []
        draw = MinibatchDraw(len(x0_all), cfg.minibatch_size, cfg.supervised.minibatch_draw == "shuffled", gen)
        for _ in range(cfg.gradient_steps):
            for _ in range(cfg.grad_accum):
                if len(x0_all) == 0:  # a process without valid samples yet adds no gradient to the step
                    continue
                idx = draw.next()
                x0 = x0_all[idx].to(device)
                embeds = self._embeds(idx, cond_all, uncond)
                passes = self._training_times(len(idx), gen)
                for times in passes:  # each pass: fresh noise at its own timesteps
                    noise = torch.randn(x0.shape, generator=gen).to(device)
                    t, latents = self._noised(x0, noise, gen, times)
                    loss, s = self._step_loss(x0, noise, latents, t, embeds, weights_all[idx].to(device))
                    (loss / (cfg.grad_accum * len(passes))).backward()
                    stats.append({**s, "loss": loss.item()})
            stats.append(guarded_step(self.ctx.optimizer, adapter.trainable_parameters(), cfg.max_grad_norm))
        out = mean_stats(stats)
        out["dataset_size"] = float(len(x0_all))
        return UpdateResult.of(out)

    def _training_times(self, batch: int, gen: torch.Generator) -> list[torch.Tensor | None]:
        """The timesteps of each training pass over one minibatch of ``batch`` samples: one pass per
        entry, each (B,) network timesteps, or None for uniform random ones (the pretraining objective's)."""
        return [None]

    def _noised(self, x0: torch.Tensor, noise: torch.Tensor, gen: torch.Generator,
                timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_noised(self.adapter, x0, noise, gen, timesteps)

    def state_dict(self) -> dict[str, Any]:
        x0, cond, rewards = self._tensors() if self.data["x0"] else (torch.zeros(0),) * 3
        state = {"x0": x0, "cond": cond, "rewards": rewards}
        for name in ("pooled", "time_ids"):
            if self.data.get(name):
                state[name] = torch.cat(self.data[name])
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["x0"]):
            self.data = {k: [v] for k, v in state.items()}


def forward_noised(adapter: Any, x0: torch.Tensor, noise: torch.Tensor, gen: torch.Generator,  # noqa: ANN401
                   timesteps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps (B,), x_t (B, C, h, w)): x_0 noised by ``adapter``'s model's forward process at
    ``timesteps`` (the network's, (B,)), or at random times drawn from ``gen`` when None.

    DDPM family: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, random t uniform over the training
    steps. Flow family: x_t = (1 - t) x_0 + t eps with t = timestep / 1000, random t uniform in [0, 1)."""
    if adapter.is_flow:
        if timesteps is None:
            t = torch.rand(len(x0), generator=gen).to(x0.device)
        else:
            t = timesteps.float().to(x0.device) / adapter.num_train_timesteps
        return t * adapter.num_train_timesteps, flow_forward(x0, noise, t).to(adapter.dtype)
    if timesteps is None:
        t = torch.randint(0, adapter.num_train_timesteps, (len(x0),), generator=gen).to(x0.device)
    else:
        t = timesteps.long().to(x0.device)
    a = adapter.alphas_cumprod[t].view(-1, 1, 1, 1)
    return t, (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(adapter.dtype)


@ALGORITHMS.register
class SFTKL(_Supervised):
    """Reward-weighted denoising on the pretrained model's samples, plus gamma x KL bound."""

    name = "sft-kl"
    samples_from_reference = True

    def _weights(self, rewards: torch.Tensor) -> torch.Tensor:
        return sft_weights(rewards)

    def _loss(self, pred, target, latents, timesteps, embeds, weights):  # noqa: ANN001, ANN202
        ref = self._prediction(latents, timesteps, embeds, reference=True).float()
        return sft_kl_loss(pred, target, ref, weights, self.cfg.supervised.gamma)


@ALGORITHMS.register
class RWR(_Supervised):
    """Reward-weighted regression on this round's own samples."""

    name = "rwr"

    def update(self, rollout: Rollout) -> UpdateResult:
        self.data = {"x0": [], "cond": [], "rewards": []}  # on-policy: this round only
        return super().update(rollout)

    def _weights(self, rewards: torch.Tensor) -> torch.Tensor:
        return rwr_weights(rewards, self.cfg.supervised.rwr_temperature)


@ALGORITHMS.register
class SparseRWR(RWR):
    """RWR keeping only the samples at or above a reward percentile."""

    name = "rwr-sparse"

    def _weights(self, rewards: torch.Tensor) -> torch.Tensor:
        return rwr_sparse_weights(rewards, self.cfg.supervised.rwr_percentile)
