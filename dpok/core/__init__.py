"""Pure-torch math of RL fine-tuning for diffusion models: step Gaussians, advantages, losses.

Nothing in this package imports diffusers, so it can be tested and reused without a pipeline.
"""

from dpok.core.advantages import PerPromptStatTracker, clip_advantages, group_advantages, trunk_advantages
from dpok.core.ddim import (
    PREDICTION_TYPES,
    StepDistribution,
    ddim_log_prob,
    ddim_sample_next,
    ddim_step_distribution,
    predict_x0_and_eps,
    previous_timestep,
)
from dpok.core.flow import flow_forward, flow_sde_sigma, flow_sde_step_distribution, flow_velocity_target
from dpok.core.gaussian import gaussian_kl_same_std, gaussian_log_prob
from dpok.core.kl import step_kl
from dpok.core.losses import (
    SURROGATES,
    ddpo_is_loss,
    ddpo_sf_loss,
    dpok_loss,
    grpo_loss,
    rwr_loss,
    rwr_sparse_weights,
    rwr_weights,
    sft_kl_loss,
    sft_weights,
    value_loss,
)
from dpok.core.nft import flow_x0_prediction, nft_loss, nft_optimality, old_policy_decay, vp_to_flow
from dpok.core.schedules import LR_SCHEDULES, lr_factor
from dpok.core.solvers import dpm_solver_pp_step, half_log_snr
from dpok.core.steps import step_window

__all__ = [
    "flow_forward",
    "flow_sde_sigma",
    "flow_sde_step_distribution",
    "flow_velocity_target",
    "flow_x0_prediction",
    "grpo_loss",
    "nft_loss",
    "nft_optimality",
    "old_policy_decay",
    "vp_to_flow",
    "LR_SCHEDULES",
    "dpm_solver_pp_step",
    "half_log_snr",
    "lr_factor",
    "SURROGATES",
    "group_advantages",
    "trunk_advantages",
    "step_window",
    "PREDICTION_TYPES",
    "PerPromptStatTracker",
    "StepDistribution",
    "clip_advantages",
    "ddim_log_prob",
    "ddim_sample_next",
    "ddim_step_distribution",
    "ddpo_is_loss",
    "ddpo_sf_loss",
    "dpok_loss",
    "gaussian_kl_same_std",
    "gaussian_log_prob",
    "predict_x0_and_eps",
    "previous_timestep",
    "rwr_loss",
    "rwr_sparse_weights",
    "rwr_weights",
    "sft_kl_loss",
    "sft_weights",
    "step_kl",
    "value_loss",
]
