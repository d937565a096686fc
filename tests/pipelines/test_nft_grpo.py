"""GRPO and DiffusionNFT on a tiny random pipeline: the sampling policy of NFT, its rollout sampler,
settings that belong to one algorithm, and a run that resumes bit for bit."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch

from dpok.algorithms import ALGORITHMS
from dpok.config import TrainConfig, build_config
from dpok.trainer import Trainer
from tests.pipelines.test_training import _context, _rollout, make_adapter, small_cfg


def test_nft_samples_with_the_old_policy_and_moves_it_by_the_decay(tiny_pipeline_dir: Path) -> None:
    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(algorithm="diffusion-nft", gradient_steps=2, nft_decay_rate=0.25, nft_decay_max=0.4)
    nft = ALGORITHMS.create("diffusion-nft", _context(adapter, cfg))
    theta0 = [p.detach().clone() for p in adapter.trainable_parameters()]
    stats = nft.update(_rollout(adapter, cfg)).metrics()
    theta1 = [p.detach().clone() for p in adapter.trainable_parameters()]
    assert stats["old_policy_decay"] == pytest.approx(0.4)  # min(0.25 x 2 steps, 0.4)
    assert any(not torch.equal(a, b) for a, b in zip(theta0, theta1))
    for old, t0, t1 in zip(nft.old, theta0, theta1):  # theta_old = 0.4 theta_0 + 0.6 theta_1
        torch.testing.assert_close(old, 0.4 * t0 + 0.6 * t1)
    with nft.sampling_policy():
        assert all(torch.equal(p, o) for p, o in zip(adapter.trainable_parameters(), nft.old))
    assert all(torch.equal(p, t) for p, t in zip(adapter.trainable_parameters(), theta1))  # put back exactly


def test_nft_with_equal_rewards_does_not_move_at_the_first_step(tiny_pipeline_dir: Path) -> None:
    """All rewards equal: every r = 1/2 and theta = theta_old, so the loss is stationary (zero gradient)."""
    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(algorithm="diffusion-nft", weight_decay=0.0, beta=0.0)
    nft = ALGORITHMS.create("diffusion-nft", _context(adapter, cfg))
    rollout = _rollout(adapter, cfg)
    rollout.rewards = torch.tensor([0.3, 0.3])
    stats = nft.update(rollout).metrics()
    # (Adam would still step on rounding noise of this size: the gradient is the claim)
    assert stats["optimality_mean"] == 0.5 and stats["grad_norm"] < 1e-6


def test_nft_rollouts_with_their_own_sampler_and_a_resume_bit_for_bit(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    def cfg(out: str, **kw: object) -> TrainConfig:
        # a reward that differs between samples of a random model: the update has something to learn
        return build_config(None, {**dict(model=str(tiny_pipeline_dir), reward="jpeg-compressibility",
                                          prompt=["a red circle"], algorithm="diffusion-nft", rounds=3,
                                          samples_per_round=2, sample_batch_size=2, minibatch_size=2, gradient_steps=1,
                                          num_steps=4, rollout_steps=2, rollout_eta=0.0, eval_images=1,
                                          learning_rate=1e-2, checkpoint_every=1, output_dir=str(tmp_path / out)),
                                   **kw})

    traj = Trainer(cfg("c")).sample(["a red circle"] * 2)
    assert traj.num_steps == 2 and torch.equal(traj.log_probs, torch.zeros(2, 2))  # deterministic DDIM, 2 steps
    dpm = Trainer(cfg("d", rollout_solver="dpm-solver++")).sample(["a red circle"] * 2)  # the same x_T, solved
    assert torch.equal(dpm.latents[:, 0], traj.latents[:, 0]) and torch.isfinite(dpm.final_latents).all()
    assert not torch.allclose(dpm.final_latents, traj.final_latents)  # DPM-Solver's last step goes to the data
    Trainer(cfg("a")).run()
    rows = [r for r in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("NaN" in r for r in rows)  # no KL bound along deterministic rollouts
    first = Trainer(cfg("b"))
    first.stop_signal = signal.SIGTERM  # as if SIGTERM arrived during round 1
    with pytest.raises(SystemExit):
        first.run()
    resumed = Trainer(cfg("b", resume=str(tmp_path / "b")))
    assert resumed.round == 1
    resumed.run()
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k or "lora_up" in k)  # it learned something


def test_grpo_adds_the_reference_kl_and_equals_ddpo_is_without_it(tiny_pipeline_dir: Path) -> None:
    results = {}
    for name, beta in (("ddpo-is", 0.0), ("grpo", 0.0), ("grpo", 1.0)):
        adapter = make_adapter(tiny_pipeline_dir)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in adapter.trainable_parameters():  # a LoRA away from zero, so the policy differs from the reference
                p.copy_(0.1 * torch.randn_like(p))
        cfg = small_cfg(algorithm=name, beta=beta, advantage="group")
        algo = ALGORITHMS.create(name, _context(adapter, cfg))
        stats = algo.update(_rollout(adapter, cfg)).metrics()
        results[(name, beta)] = (stats, [p.detach().clone() for p in adapter.trainable_parameters()])
    (s_ddpo, w_ddpo), (s_grpo, w_grpo), (s_kl, _) = results.values()
    assert all(torch.equal(a, b) for a, b in zip(w_ddpo, w_grpo))  # beta 0: the same update
    assert s_kl["kl"] > 0 and s_kl["loss"] > s_grpo["loss"]


def test_settings_of_one_algorithm_are_refused_for_another() -> None:
    with pytest.raises(ValueError, match="--rollout-solver and --nft-train-steps are DiffusionNFT's"):
        TrainConfig.from_options(algorithm="dpok", rollout_steps=5).validate()
    for other in ({"rollout_solver": "dpm-solver++"}, {"nft_train_steps": 3}):
        with pytest.raises(ValueError, match="nft-train-steps are DiffusionNFT's"):
            TrainConfig.from_options(algorithm="grpo", **other).validate()
    with pytest.raises(ValueError, match="--rollout-solver dpm-solver\\+\\+ solves the deterministic ODE"):
        TrainConfig.from_options(algorithm="diffusion-nft", rollout_solver="dpm-solver++").validate()
    TrainConfig.from_options(algorithm="diffusion-nft", rollout_solver="dpm-solver++", rollout_eta=0.0).validate()
    with pytest.raises(ValueError, match="not one --algorithm grpo takes"):
        TrainConfig.from_options(algorithm="grpo", advantage="tracker").validate()
    with pytest.raises(ValueError, match="nft-beta"):
        TrainConfig.from_options(algorithm="diffusion-nft", nft_beta=0.0).validate()
    TrainConfig.from_options(algorithm="diffusion-nft", rollout_eta=0.0, rollout_steps=5).validate()
    assert math.isfinite(TrainConfig().nft.nft_beta)


def test_shuffled_minibatches_train_each_sample_of_the_round_once(tiny_pipeline_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dpok.algorithms import supervised

    drawn: list[int] = []
    plain_next = supervised.MinibatchDraw.next

    def spy(self: supervised.MinibatchDraw) -> torch.Tensor:
        idx = plain_next(self)
        drawn.extend(idx.tolist())
        return idx

    monkeypatch.setattr(supervised.MinibatchDraw, "next", spy)
    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(algorithm="diffusion-nft", minibatch_draw="shuffled", minibatch_size=1, grad_accum=2,
                    adv_global_std=True)
    assert cfg.supervised.minibatch_draw == "shuffled" and cfg.policy_gradient.adv_global_std
    nft = ALGORITHMS.create("diffusion-nft", _context(adapter, cfg))
    nft.update(_rollout(adapter, cfg))
    assert sorted(drawn) == [0, 1]  # both samples, once each


def test_global_std_reaches_the_trajectory_advantages() -> None:
    from dpok.algorithms.base import trajectory_advantages
    from dpok.core import PerPromptStatTracker, group_advantages

    prompts, rewards = ["a", "a", "b", "b"], torch.tensor([0.0, 1.0, 0.5, 0.6])
    valid = torch.ones(4, dtype=torch.bool)
    got = trajectory_advantages("group", PerPromptStatTracker(4, 1), prompts, rewards, valid, 5.0, global_std=True)
    torch.testing.assert_close(got, group_advantages(prompts, rewards, global_std=True))
    assert not torch.allclose(got, trajectory_advantages("group", PerPromptStatTracker(4, 1), prompts, rewards,
                                                         valid, 5.0))


def _spy_noised(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Records (x_0, eps, network timesteps, x_t) of every training pass of the supervised update."""
    from dpok.algorithms import supervised

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    plain = supervised._Supervised._noised

    def spy(self, x0, noise, gen, timesteps=None):  # noqa: ANN001, ANN202
        t, latents = plain(self, x0, noise, gen, timesteps)
        seen.append((x0, noise, t, latents))
        return t, latents

    monkeypatch.setattr(supervised._Supervised, "_noised", spy)
    return seen


def test_nft_trains_at_k_of_the_rollout_samplers_own_timesteps(tiny_pipeline_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy_noised(monkeypatch)
    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(algorithm="diffusion-nft", nft_train_steps=3, num_steps=4, grad_accum=2)
    nft = ALGORITHMS.create("diffusion-nft", _context(adapter, cfg))
    rollout = _rollout(adapter, cfg)
    grid = set(rollout.trajectory.timesteps.tolist())
    assert len(grid) == 4
    nft.update(rollout)
    assert len(seen) == 2 * 3  # 2 minibatches, 3 passes each, fresh noise each
    abar = adapter.alphas_cumprod
    for x0, noise, t, latents in seen:  # x_t of the forward process at the given timesteps
        assert set(t.tolist()) <= grid
        a = abar[t].view(-1, 1, 1, 1)
        torch.testing.assert_close(latents, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    for draw in (seen[:3], seen[3:]):  # within a minibatch each sample meets 3 distinct timesteps
        per_sample = torch.stack([t for _, _, t, _ in draw], dim=1)  # (B, 3)
        assert all(len(set(row.tolist())) == 3 for row in per_sample)
        assert not torch.equal(draw[0][1], draw[1][1])
    with pytest.raises(ValueError, match="nft-train-steps"):
        TrainConfig.from_options(algorithm="diffusion-nft", nft_train_steps=-1).validate()


def test_nft_train_steps_more_than_the_sampler_has_train_each_once(tiny_pipeline_dir: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy_noised(monkeypatch)
    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(algorithm="diffusion-nft", nft_train_steps=9, num_steps=2)
    ALGORITHMS.create("diffusion-nft", _context(adapter, cfg)).update(_rollout(adapter, cfg))
    assert len(seen) == 2
    assert sorted(t[0].item() for _, _, t, _ in seen) == sorted(_rollout(adapter, cfg).trajectory.timesteps.tolist())


@pytest.mark.parametrize("k", [0, 3])
def test_the_passes_of_a_minibatch_average_into_the_step(tiny_pipeline_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                          k: int) -> None:
    """Each pass's loss sum(theta) has gradient 1 per weight: over K passes and 2 accumulated minibatches the
    step must see exactly 1 (the mean), not K or 2K."""
    from dpok.algorithms import base, nft

    def unit_loss(self, *args):  # noqa: ANN001, ANN002, ANN202
        return sum(p.sum() for p in self.adapter.trainable_parameters()), {}

    grads: list[torch.Tensor] = []
    plain_step = base.guarded_step

    def spy_step(optimizer, params, max_norm):  # noqa: ANN001, ANN202
        grads.extend(p.grad.clone() for p in params)
        return plain_step(optimizer, params, max_norm)

    monkeypatch.setattr(nft.DiffusionNFT, "_step_loss", unit_loss)
    monkeypatch.setattr("dpok.algorithms.supervised.guarded_step", spy_step)
    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(algorithm="diffusion-nft", nft_train_steps=k, grad_accum=2, minibatch_size=1, max_grad_norm=1e9)
    ALGORITHMS.create("diffusion-nft", _context(adapter, cfg)).update(_rollout(adapter, cfg))
    assert grads and all(torch.equal(g, torch.ones_like(g)) for g in grads)


def test_the_default_update_draws_its_random_numbers_in_the_order_it_always_has(
        tiny_pipeline_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Minibatch indices, then per draw the noise and then the timesteps, from the run's generator:
    the order runs saved before --nft-train-steps existed resume with, bit for bit."""
    seen = _spy_noised(monkeypatch)
    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(algorithm="diffusion-nft", grad_accum=2, minibatch_size=2)
    rollout = _rollout(adapter, cfg)
    ALGORITHMS.create("diffusion-nft", _context(adapter, cfg)).update(rollout)
    gen = torch.Generator().manual_seed(0)  # the context's generator
    shape = rollout.trajectory.final_latents.shape
    for _, noise, t, _ in seen:
        torch.randint(0, 2, (2,), generator=gen)
        torch.testing.assert_close(noise, torch.randn(shape, generator=gen), rtol=0, atol=0)
        assert torch.equal(t, torch.randint(0, 1000, (2,), generator=gen))
    assert len(seen) == 2
