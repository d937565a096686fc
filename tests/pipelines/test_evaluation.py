"""Evaluation measures beyond the reward: the KL to the base model along sampled trajectories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpok.adapter import DiffusionAdapter
from dpok.evaluate import SampleSettings, evaluate_prompt, sample_prompt, split_means, trajectory_kl
from dpok.rewards import make_reward
from dpok.shapeworld.domain import DOMAIN as SHAPEWORLD

SETTINGS = SampleSettings(num_images=3, num_steps=3, guidance_scale=3.0, eta=1.0)


def _lora_scale(adapter: DiffusionAdapter, scale: float, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def test_kl_is_zero_for_the_base_and_grows_with_the_lora_update(tiny_pipeline_dir: Path) -> None:
    adapter = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    traj = sample_prompt(adapter, "a red circle", SETTINGS, seed=0)
    assert torch.equal(trajectory_kl(adapter, traj, SETTINGS), torch.zeros(3))
    adapter.add_lora(rank=2, alpha=2.0)  # B = 0: still the base policy, now measured through the reference path
    assert trajectory_kl(adapter, traj, SETTINGS).abs().max() < 1e-6
    kls = []
    for scale in (0.01, 0.02):
        _lora_scale(adapter, scale)
        kls.append(trajectory_kl(adapter, sample_prompt(adapter, "a red circle", SETTINGS, seed=0), SETTINGS))
    assert (kls[0] > 0).all()
    # closed-form KL is quadratic in the mean shift, which is linear in B for small B
    ratio = float(kls[1].mean() / kls[0].mean())
    assert 3.0 < ratio < 5.0, ratio


def test_kl_matches_a_direct_sum_over_steps(tiny_pipeline_dir: Path) -> None:
    from dpok.sampling import policy_step

    adapter = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    adapter.add_lora(rank=2, alpha=2.0)
    _lora_scale(adapter, 0.05)
    traj = sample_prompt(adapter, "two blue squares", SETTINGS, seed=3)
    expected = torch.zeros(traj.batch_size)
    with torch.no_grad():
        for i, t in enumerate(traj.timesteps):
            args = (traj.latents[:, i], t.expand(traj.batch_size), traj.embeds, SETTINGS.guidance_scale, SETTINGS.eta,
                    SETTINGS.num_steps)
            p, _ = policy_step(adapter, *args)
            q, _ = policy_step(adapter, *args, reference=True)
            expected += ((p.mean - q.mean) ** 2 / (2 * p.std**2)).flatten(1).sum(1)
    torch.testing.assert_close(trajectory_kl(adapter, traj, SETTINGS, chunk=2), expected, rtol=1e-4, atol=1e-7)


def test_evaluate_prompt_reports_every_measure(tiny_pipeline_dir: Path, tiny_reward_dir: Path) -> None:
    adapter = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    reward = make_reward("shapeworld-alignment", alignment_model=str(tiny_reward_dir))
    row, images = evaluate_prompt(adapter, reward, "a red circle", SETTINGS, seed=0, domain=SHAPEWORLD)
    assert images.shape[0] == 3
    for key in ("reward_mean", "reward_std", "invalid", "diversity", "kl_to_base", "judge_aligned", "clean_share",
                "frechet"):
        assert key in row
    assert row["kl_to_base"] == 0.0
    # images from elsewhere (e.g. best-of-n): KL is not measured, everything else is
    row2, _ = evaluate_prompt(adapter, reward, "a red circle", SETTINGS, 0, SHAPEWORLD, images=images)
    assert row2["reward_mean"] == pytest.approx(row["reward_mean"])
    assert row2["kl_to_base"] != row2["kl_to_base"]  # NaN
    means = split_means({"a": row, "b": {**row, "reward_mean": row["reward_mean"] + 1}})
    assert means["reward_mean"] == pytest.approx(row["reward_mean"] + 0.5)
    assert "frechet_mean" in means and "kl_to_base_mean" in means


def test_eta_zero_evaluates_the_deterministic_sampler_without_a_kl(tiny_pipeline_dir: Path, tiny_reward_dir: Path) -> None:
    from dpok.evaluate import EvalConfig
    from dpok.sampling import sample_in_batches

    adapter = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    _lora_scale(adapter, 0.05)
    reward = make_reward("shapeworld-alignment", alignment_model=str(tiny_reward_dir))
    settings = SampleSettings(num_images=2, num_steps=3, guidance_scale=3.0, eta=0.0)
    row, images = evaluate_prompt(adapter, reward, "a red circle", settings, seed=5, domain=SHAPEWORLD)
    assert row["kl_to_base"] != row["kl_to_base"] and 0 <= row["judge_aligned"] <= 1  # NaN: not measured
    direct = sample_in_batches(adapter, ["a red circle"] * 2, settings.batch_size, 3, 0.0, 3.0,
                               torch.Generator().manual_seed(5), with_log_probs=False)
    assert torch.equal(images, direct.images)
    EvalConfig(prompt=["a red circle"], eta=0.0).validate()
    with pytest.raises(ValueError, match="--eta must be >= 0"):
        EvalConfig(prompt=["a red circle"], eta=-0.5).validate()
