"""Trajectory sampling with classifier-free guidance, and re-evaluation of recorded steps.

``step_distribution`` is the single function that turns (x_t, t, z) into the Gaussian policy
p_theta(x_{t-1} | x_t, z) = N(mu_theta, sigma_t^2 I): sampling calls it under
``torch.inference_mode`` and training calls it with gradients on the same inputs, so the
importance ratio is exactly 1 before the first update.

The policy step depends on the model family: DDIM with stochasticity ``eta`` for the diffusion
models (SD 1.x, 2.x, SDXL), Flow-GRPO's SDE with noise level a = ``eta`` for the flow-matching
models (SD3, FLUX; see :mod:`dpok.core.flow`). Everything else (trajectories, log-probs, KL) is
the same for both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .adapter import DiffusionAdapter, PromptEmbeds
from .core import (
    StepDistribution,
    ddim_log_prob,
    ddim_sample_next,
    ddim_step_distribution,
    dpm_solver_pp_step,
    flow_sde_step_distribution,
    flow_x0_prediction,
    gaussian_kl_same_std,
    predict_x0_and_eps,
    previous_timestep,
    step_kl,
)

SOLVERS = ("ddim", "dpm-solver++")  # the rollout solvers: the policy's own step, or DPM-Solver++(2M) (eta 0)


@dataclass
class Trajectory:
    """A batch of B denoising trajectories of T steps (``latents[:, i]`` = x_t at step i).

    - ``latents``, ``next_latents``: (B, T, C, h, w) x_t and the sampled x_{t-1}
    - ``timesteps``: (T,) high to low: long for DDIM, float (1000 t) for a flow model
    - ``log_probs``: (B, T) log p_old(x_{t-1} | x_t, z) at sampling time
    - ``final_latents``: (B, C, h, w) x_0; ``images``: (B, 3, H, W) in [0, 1]
    - ``means``: (n, T, C, h, w) mu_theta(x_t, t) of the sampling policy's steps for the first n <= B
      trajectories (kept so that the rollout KL needs only the reference's forward), or None
    """

    prompts: list[str]
    embeds: PromptEmbeds
    latents: torch.Tensor
    next_latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    final_latents: torch.Tensor
    images: torch.Tensor
    logprob_reduce: str = "sum"  # how ``log_probs`` were reduced over latent elements
    means: torch.Tensor | None = None

    def check_reduce(self, expected: str) -> None:
        """Ratios are only meaningful when old and new log-probs are reduced the same way."""
        if self.logprob_reduce != expected:
            raise ValueError(f"trajectory log-probs were reduced with {self.logprob_reduce!r} but the update uses "
                             f"logprob_reduce={expected!r}; sample with the same setting")

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    @staticmethod
    def cat(items: list[Trajectory]) -> Trajectory:
        return Trajectory(
            prompts=[p for t in items for p in t.prompts],
            embeds=PromptEmbeds.cat([t.embeds for t in items]),
            latents=torch.cat([t.latents for t in items]),
            next_latents=torch.cat([t.next_latents for t in items]),
            timesteps=items[0].timesteps,
            log_probs=torch.cat([t.log_probs for t in items]),
            final_latents=torch.cat([t.final_latents for t in items]),
            images=torch.cat([t.images for t in items]),
            logprob_reduce=items[0].logprob_reduce,
            # the kept means belong to the leading trajectories, so the parts that have them come first
            means=torch.cat([t.means for t in items if t.means is not None])
            if items[0].means is not None else None,
        )


def policy_step(adapter: DiffusionAdapter, latents: torch.Tensor, timesteps: torch.Tensor,
                embeds: PromptEmbeds, guidance_scale: float, eta: float, num_steps: int,
                reference: bool = False) -> tuple[StepDistribution, torch.Tensor]:
    """p(x_{t-1} | x_t, z) for a batch with per-sample timesteps (B,), and the guided model output.

    ``eta``: DDIM's stochasticity, or the SDE noise level a of a flow model. ``reference=True``
    evaluates the pretrained policy (LoRA disabled / frozen copy), no grad.
    """
    model_output = adapter.noise_pred(latents, timesteps, embeds, guidance_scale, reference=reference)
    if adapter.is_flow:
        t, t_next, t_cap = adapter.flow_times(timesteps, num_steps)
        return flow_sde_step_distribution(model_output, latents, t, t_next, eta, t_cap), model_output
    prev = previous_timestep(timesteps, adapter.num_train_timesteps, num_steps)
    dist = ddim_step_distribution(model_output, latents, timesteps, prev, adapter.alphas_cumprod, eta,
                                  adapter.final_alpha_cumprod, adapter.prediction_type)
    return dist, model_output


def step_distribution(adapter: DiffusionAdapter, latents: torch.Tensor, timesteps: torch.Tensor,
                      embeds: PromptEmbeds, guidance_scale: float, eta: float, num_steps: int,
                      reference: bool = False) -> StepDistribution:
    """:func:`policy_step` without the model output."""
    return policy_step(adapter, latents, timesteps, embeds, guidance_scale, eta, num_steps, reference)[0]


def alpha_sigma(adapter: DiffusionAdapter, timestep: torch.Tensor | None, num_steps: int) -> tuple[float, float]:
    """(alpha_t, sigma_t) of x_t = alpha_t x_0 + sigma_t eps at one network ``timestep``; None is the
    data (1, 0). DDPM family: (sqrt(abar_t), sqrt(1 - abar_t)); flow: (1 - t, t)."""
    if timestep is None:
        return 1.0, 0.0
    if adapter.is_flow:
        t = float(adapter.flow_times(timestep.reshape(1), num_steps)[0])
        return 1.0 - t, t
    abar = float(adapter.alphas_cumprod[timestep.long()])
    return abar ** 0.5, (1.0 - abar) ** 0.5


def x0_prediction(adapter: DiffusionAdapter, latents: torch.Tensor, timesteps: torch.Tensor,
                  model_output: torch.Tensor, num_steps: int) -> torch.Tensor:
    """The x_0 that a (guided) network output predicts at (x_t, t), (B, C, h, w) float32."""
    latents, model_output = latents.float(), model_output.float()
    if adapter.is_flow:
        return flow_x0_prediction(latents, adapter.flow_times(timesteps, num_steps)[0], model_output)
    abar = adapter.alphas_cumprod[timesteps.long()].view(-1, *[1] * (latents.ndim - 1))
    return predict_x0_and_eps(model_output, latents, abar, adapter.prediction_type)[0]


def initial_noise(adapter: DiffusionAdapter, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn((n, *adapter.latent_shape), generator=generator, device=generator.device).to(adapter.device)


@torch.inference_mode()
def sample_trajectories(adapter: DiffusionAdapter, prompts: list[str], num_steps: int, eta: float,
                        guidance_scale: float, generator: torch.Generator, reference: bool = False,
                        logprob_reduce: str = "sum", with_log_probs: bool = True, keep_means: int = 0,
                        initial: torch.Tensor | None = None, start_step: int = 0,
                        stop_step: int = 0, solver: str = "ddim") -> Trajectory:
    """Sample one trajectory per prompt with DDIM (eta > 0 makes it a stochastic policy), or with
    Flow-GRPO's SDE at noise level a = ``eta`` for a flow model (a = 0: the flow-match Euler ODE).

    Noise comes from ``generator`` only (x_T, then one draw per step), so the same generator state
    gives the same images. ``reference=True`` samples the pretrained model (SFT's data).
    ``with_log_probs=False`` (a likelihood-free method's rollouts) allows eta = 0, deterministic
    DDIM; its ``log_probs`` are then zeros. ``keep_means``: how many of the leading trajectories keep
    their step means (``Trajectory.means``). ``initial``: the initial noise x_T (B, C, h, w) to start
    from instead of a draw from ``generator``; with ``start_step`` s > 0 it is instead the state
    reached after s of the ``num_steps`` steps, and the trajectory holds the remaining steps only
    (a continuation, e.g. to branch a trajectory mid-way). ``stop_step`` s' > 0: stop after step
    s' - 1 (a trunk to branch from): ``final_latents`` is then that state and ``images`` is empty,
    nothing being decoded. ``solver="dpm-solver++"`` (eta 0, without log-probs): the same timesteps
    solved with DPM-Solver++(2M) (:func:`dpok.core.dpm_solver_pp_step`), the last step to the data
    itself; each step still draws its noise, so the generator moves on as with DDIM.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)} (got {solver!r})")
    if solver != "ddim" and (eta != 0 or with_log_probs or start_step or stop_step or keep_means):
        raise ValueError(f"solver {solver!r} is a deterministic ODE solver: it samples whole trajectories with eta 0, "
                         "no log-probs and no step means")
    stop = stop_step or num_steps
    if not 0 <= start_step < stop <= num_steps or (start_step and initial is None):
        raise ValueError(f"start_step must be in [0, {num_steps}), before stop_step ({stop_step}), and when > 0 "
                         f"come with the state it starts from (got {start_step})")
    if eta < 0 or (eta == 0 and with_log_probs):
        raise ValueError(f"eta must be > 0 to sample a trajectory with log-probs (got {eta}); "
                         "eta = 0 is deterministic (DDIM, or a flow model's Euler ODE) and has no log-prob")
    embeds = adapter.encode_prompts(prompts)
    x = initial_noise(adapter, len(prompts), generator) if initial is None else initial.to(adapter.device)
    timesteps = adapter.timesteps(num_steps)[start_step:stop]
    latents, next_latents, log_probs, means = [], [], [], []
    solved: tuple[torch.Tensor, tuple[float, float]] | None = None  # DPM-Solver: the previous step's (x_0, time)
    for i, t in enumerate(timesteps):
        t_batch = t.expand(len(prompts))
        if solver == "ddim":  # (a denoising step is step_distribution's call: the chaos test kills there)
            dist = step_distribution(adapter, x, t_batch, embeds, guidance_scale, eta, num_steps, reference)
            noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
            x_next = ddim_sample_next(dist, noise).to(x.dtype)
        else:
            dist, out = policy_step(adapter, x, t_batch, embeds, guidance_scale, eta, num_steps, reference)
            torch.randn(x.shape, generator=generator, device=generator.device)  # the generator moves on as with DDIM
            d, now = x0_prediction(adapter, x, t_batch, out, num_steps), alpha_sigma(adapter, t, num_steps)
            to = alpha_sigma(adapter, timesteps[i + 1] if i + 1 < len(timesteps) else None, num_steps)
            x_next = dpm_solver_pp_step(x.float(), d, now, to, *(solved or (None, None))).to(x.dtype)
            solved = (d, now)
        latents.append(x)
        next_latents.append(x_next)
        log_probs.append(ddim_log_prob(x_next.float(), dist, reduce=logprob_reduce) if with_log_probs
                         else torch.zeros(len(prompts), device=x.device))
        if keep_means > 0:
            means.append(dist.mean[:keep_means])
        x = x_next
    return Trajectory(
        prompts=list(prompts), embeds=embeds,
        latents=torch.stack(latents, 1), next_latents=torch.stack(next_latents, 1),
        timesteps=timesteps, log_probs=torch.stack(log_probs, 1),
        final_latents=x, images=adapter.decode(x) if stop == num_steps else x.new_zeros(0),
        logprob_reduce=logprob_reduce, means=torch.stack(means, 1) if means else None,
    )


def _after_trunk(trunk: Trajectory, rows: slice, rest: Trajectory) -> Trajectory:
    """The whole trajectories of the branches ``rest`` continued from ``trunk``'s rows ``rows``
    (the trunk's steps first, then the branch's)."""
    means = None
    if rest.means is not None:
        means = torch.cat([trunk.means[rows][: len(rest.means)], rest.means], 1)
    return dataclasses.replace(
        rest, latents=torch.cat([trunk.latents[rows], rest.latents], 1),
        next_latents=torch.cat([trunk.next_latents[rows], rest.next_latents], 1),
        timesteps=torch.cat([trunk.timesteps, rest.timesteps]),
        log_probs=torch.cat([trunk.log_probs[rows], rest.log_probs], 1), means=means)


def sample_in_batches(adapter: DiffusionAdapter, prompts: list[str], batch_size: int, num_steps: int, eta: float,
                      guidance_scale: float, generator: torch.Generator, reference: bool = False,
                      logprob_reduce: str = "sum", with_log_probs: bool = True,
                      on_batch: Callable[[Trajectory], None] | None = None, keep_means: int = 0,
                      shared_noise: int = 0, branch_step: int = 0, solver: str = "ddim") -> Trajectory:
    """:func:`sample_trajectories` over ``prompts`` in batches of ``batch_size``, joined in order.

    ``on_batch`` is handed each batch as soon as it is sampled (the trainer starts scoring it
    there, beside the next batch's sampling); it does not change what is sampled. The first
    ``keep_means`` trajectories keep their step means. ``shared_noise`` = k > 1: each run of k
    trajectories in a row (a prompt's group) starts from one initial noise x_T, drawn for every
    group before the first batch (groups may straddle batches); only the steps' noise differs.
    ``branch_step`` s > 0 (with ``shared_noise``): each group also shares its first s steps, a
    trunk sampled for every group before the first batch, from which its k trajectories branch.
    ``solver``: as :func:`sample_trajectories`."""
    initial, trunk = None, None
    if shared_noise > 1:
        if len(prompts) % shared_noise:
            raise ValueError(f"{len(prompts)} trajectories do not split into groups of {shared_noise} sharing x_T")
        initial = initial_noise(adapter, len(prompts) // shared_noise, generator)
        if branch_step:
            trunk = sample_trajectories(adapter, prompts[::shared_noise], num_steps, eta, guidance_scale, generator,
                                        reference, logprob_reduce, with_log_probs,
                                        keep_means=len(initial) if keep_means else 0,
                                        initial=initial, stop_step=branch_step)
            trunk = dataclasses.replace(trunk, **{k: getattr(trunk, k).repeat_interleave(shared_noise, 0) for k in
                                                  ("latents", "next_latents", "log_probs", "final_latents", "means")
                                                  if getattr(trunk, k) is not None})
            initial = trunk.final_latents
        else:
            initial = initial.repeat_interleave(shared_noise, 0)
    elif branch_step:
        raise ValueError("branch_step needs groups of trajectories (shared_noise > 1) to branch")
    parts = []
    for i in range(0, len(prompts), batch_size):
        rows = slice(i, i + batch_size)
        part = sample_trajectories(adapter, prompts[rows], num_steps, eta, guidance_scale, generator, reference,
                                   logprob_reduce, with_log_probs, keep_means=max(0, keep_means - i),
                                   initial=None if initial is None else initial[rows], start_step=branch_step,
                                   solver=solver)
        parts.append(part if trunk is None else _after_trunk(trunk, rows, part))
        if on_batch is not None:
            on_batch(parts[-1])
    return Trajectory.cat(parts)


def evaluate_log_probs(adapter: DiffusionAdapter, latents: torch.Tensor, next_latents: torch.Tensor,
                       timesteps: torch.Tensor, embeds: PromptEmbeds, guidance_scale: float, eta: float,
                       num_steps: int, logprob_reduce: str = "sum"
                       ) -> tuple[torch.Tensor, StepDistribution, torch.Tensor]:
    """log p_theta(x_{t-1} | x_t, z) of recorded transitions (N,) with gradients, the step
    distribution and the guided model output."""
    dist, model_output = policy_step(adapter, latents, timesteps, embeds, guidance_scale, eta, num_steps)
    return ddim_log_prob(next_latents.float(), dist, reduce=logprob_reduce), dist, model_output


@dataclass(frozen=True)
class SampleSettings:
    """How evaluation images are sampled: ``num_images`` per prompt, ``num_steps``, ``eta`` > 0 (DDIM's,
    or a flow model's SDE noise level)."""

    num_images: int
    num_steps: int = 20
    guidance_scale: float = 5.0
    eta: float = 1.0
    batch_size: int = 32


def trajectory_kl(adapter: DiffusionAdapter, traj: Trajectory, settings: SampleSettings,
                  chunk: int = 8, reduce: str = "sum", limit: int | None = None) -> torch.Tensor:
    """KL to the base model along each sampled trajectory, (B,) in nats.

    sum_t KL(p_theta(x_{t-1} | x_t, z) || p_pre(x_{t-1} | x_t, z)) at the visited x_t, each term in
    closed form ||mu_theta - mu_pre||^2 / (2 sigma_t^2) summed over latent elements: a single-sample
    estimate of the DPOK upper bound on KL(p_theta(x_0 | z) || p_pre(x_0 | z)) (Lemma 4.2). Zero
    for a model without LoRA or fine-tuned weights. ``reduce="mean"`` averages each term over latent
    elements instead (on the scale of ``logprob_reduce="mean"``);
    ``limit`` keeps only the first trajectories, (limit,). Where the trajectory kept the sampling
    policy's step means (``Trajectory.means``) only the reference is evaluated: mu_theta is the mean
    the sample was drawn from (``adapter`` must then be the policy that sampled it).
    """
    n = traj.batch_size if limit is None else min(limit, traj.batch_size)
    if adapter.lora_config is None and adapter.reference_unet is None:
        return torch.zeros(n)
    out = []
    with torch.no_grad():
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n))
            x = traj.latents[idx].flatten(0, 1)
            t = traj.timesteps.repeat(len(idx))
            embeds = traj.embeds[idx.repeat_interleave(traj.num_steps)]
            args = (x, t, embeds, settings.guidance_scale, settings.eta, settings.num_steps)
            ref, ref_out = policy_step(adapter, *args, reference=True)
            if traj.means is not None and len(traj.means) > int(idx[-1]):
                kl = gaussian_kl_same_std(traj.means[idx].flatten(0, 1).to(ref.mean), ref.mean, ref.std, reduce=reduce)
            else:
                dist, model_out = policy_step(adapter, *args)
                kl = step_kl("closed-form", dist, ref, model_out, ref_out, reduce)
            out.append(kl.view(len(idx), traj.num_steps).sum(1).cpu())
    return torch.cat(out)
