"""The math of GRPO and DiffusionNFT on hand-worked tensors (no pipeline)."""

from __future__ import annotations

import pytest
import torch

from dpok.core import (
    ddpo_is_loss,
    flow_x0_prediction,
    grpo_loss,
    nft_loss,
    nft_optimality,
    old_policy_decay,
    predict_x0_and_eps,
    vp_to_flow,
)


def test_grpo_is_ddpo_is_without_kl_and_adds_beta_kl() -> None:
    g = torch.Generator().manual_seed(0)
    log_probs = torch.randn(6, generator=g).requires_grad_()
    old = log_probs.detach() + 1e-3 * torch.randn(6, generator=g)
    adv, kl = torch.randn(6, generator=g), torch.rand(6, generator=g)
    grpo, _ = grpo_loss(log_probs, old, adv, kl, beta=0.0, clip_range=1e-3)
    ddpo, _ = ddpo_is_loss(log_probs, old, adv, clip_range=1e-3)
    assert torch.allclose(grpo, ddpo)
    with_kl, stats = grpo_loss(log_probs, old, adv, kl, beta=0.5, clip_range=1e-3)
    assert torch.allclose(with_kl, ddpo + 0.5 * kl.mean())
    assert stats["kl"] == pytest.approx(kl.mean().item())


def test_optimality_maps_clipped_advantages_to_zero_one() -> None:
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    assert torch.equal(nft_optimality(a, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))
    with pytest.raises(ValueError, match="adv_clip"):
        nft_optimality(a, 0.0)


def test_nft_loss_on_a_hand_worked_case() -> None:
    # one sample, two elements: x0 = 0, x0_theta = (1, 1), x0_old = (0, 0), beta = 1:
    # positive prediction (1, 1): error 1 per element, w+ = 1 -> e+ = 1;
    # negative prediction 2 x0_old - x0_theta = (-1, -1): e- = 1; r = 0.75 -> 0.75 + 0.25 = 1
    x0 = torch.zeros(1, 2)
    loss, stats = nft_loss(torch.ones(1, 2), torch.zeros(1, 2), x0, torch.tensor([0.75]), beta=1.0)
    assert loss.item() == pytest.approx(1.0) and stats["old_deviation"] == pytest.approx(1.0)
    # beta = 0.5: positive (0.5, 0.5): 0.25 / 0.5 = 0.5; negative (-0.5, -0.5): 0.5; (0.5) / beta = 1
    loss, _ = nft_loss(torch.ones(1, 2), torch.zeros(1, 2), x0, torch.tensor([0.75]), beta=0.5)
    assert loss.item() == pytest.approx(1.0)
    # the adaptive weight w = mean |error|: errors (1, 3) -> squared mean 5, w 2 -> 2.5
    loss, s = nft_loss(torch.tensor([[1.0, 3.0]]), torch.tensor([[1.0, 3.0]]), x0, torch.tensor([1.0]), beta=1.0)
    assert loss.item() == pytest.approx(2.5) and s["negative_loss"] == pytest.approx(2.5)


def _gradient(r: torch.Tensor, beta: float, x0_theta: torch.Tensor, x0_old: torch.Tensor,
              x0: torch.Tensor) -> torch.Tensor:
    theta = x0_theta.clone().requires_grad_()
    nft_loss(theta, x0_old, x0, r, beta)[0].backward()
    return theta.grad


def test_equal_rewards_leave_the_sampling_policy_where_it_is() -> None:
    """With every r = 1/2 (all rewards equal: no preference) the loss is stationary at
    x0_theta = x0_old: training does not drift from the policy that sampled."""
    g = torch.Generator().manual_seed(1)
    x0, x0_old = torch.randn(4, 3, 2, 2, generator=g), torch.randn(4, 3, 2, 2, generator=g)
    grad = _gradient(torch.full((4,), 0.5), 0.7, x0_old, x0_old, x0)
    assert grad.abs().max() < 1e-6
    # and with r = 1 for all at beta = 1 it is the plain (weighted) denoising loss of theta
    theta = torch.randn(4, 3, 2, 2, generator=g)
    loss, _ = nft_loss(theta, x0_old, x0, torch.ones(4), beta=1.0)
    w = (theta - x0).abs().mean((1, 2, 3), keepdim=True)
    assert loss.item() == pytest.approx(((theta - x0) ** 2 / w).mean((1, 2, 3)).mean().item(), rel=1e-5)


def test_good_samples_pull_theta_towards_them_and_bad_ones_push_it_away() -> None:
    x0, old = torch.zeros(1, 4), torch.full((1, 4), 0.5)
    towards = _gradient(torch.ones(1), 1.0, old, old, x0)
    away = _gradient(torch.zeros(1), 1.0, old, old, x0)
    assert (towards > 0).all() and (away < 0).all()  # a descent step lowers x0_theta to x0 = 0 / raises it


def test_eps_v_and_velocity_forms_give_the_same_loss() -> None:
    """The loss is written on x_0 predictions: an eps-model, a v-model and a flow (velocity) model
    that make the same x_0 prediction at the same noisy point give the same loss."""
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    abar = torch.tensor([0.9, 0.5, 0.05])
    a = abar.sqrt().view(-1, 1, 1, 1)
    s = (1 - abar).sqrt().view(-1, 1, 1, 1)
    x_vp = a * x0 + s * eps
    eps_theta, eps_old = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    r = torch.tensor([0.9, 0.2, 0.5])
    x0_theta, _ = predict_x0_and_eps(eps_theta, x_vp, abar.view(-1, 1, 1, 1), "epsilon")
    x0_old, _ = predict_x0_and_eps(eps_old, x_vp, abar.view(-1, 1, 1, 1), "epsilon")
    eps_form, _ = nft_loss(x0_theta, x0_old, x0, r, beta=0.3)
    # the same predictions as v-prediction outputs v = sqrt(abar) eps - sqrt(1 - abar) x0
    v_theta, v_old = a * eps_theta - s * x0_theta, a * eps_old - s * x0_old
    v_form, _ = nft_loss(predict_x0_and_eps(v_theta, x_vp, abar.view(-1, 1, 1, 1), "v_prediction")[0],
                         predict_x0_and_eps(v_old, x_vp, abar.view(-1, 1, 1, 1), "v_prediction")[0], x0, r, beta=0.3)
    # and as velocities of rectified flow at the same point: x_flow = (1 - t) x0 + t eps
    x_flow, t = vp_to_flow(x_vp, abar)
    assert torch.allclose(x_flow, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps, atol=1e-6)
    vel_theta = (x_flow - x0_theta) / t.view(-1, 1, 1, 1)
    vel_old = (x_flow - x0_old) / t.view(-1, 1, 1, 1)
    flow_form, _ = nft_loss(flow_x0_prediction(x_flow, t, vel_theta), flow_x0_prediction(x_flow, t, vel_old), x0, r,
                            beta=0.3)
    assert eps_form.item() == pytest.approx(v_form.item(), rel=1e-4)
    assert eps_form.item() == pytest.approx(flow_form.item(), rel=1e-4)


def test_old_policy_decay_schedule() -> None:
    assert [old_policy_decay(s, 0.001, 0.5) for s in (0, 1, 100, 500, 5000)] == [0.0, 0.001, 0.1, 0.5, 0.5]


def test_nft_loss_rejects_bad_shapes_and_beta() -> None:
    with pytest.raises(ValueError, match="beta"):
        nft_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), beta=0.0)
    with pytest.raises(ValueError, match="shapes"):
        nft_loss(torch.zeros(2, 2), torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1), beta=1.0)


def test_group_advantages_with_the_global_std_on_a_hand_worked_batch() -> None:
    """Groups a = (0, 1), b = (0.5, 0.6), c = (0.9), one NaN: the finite rewards' population std is
    sqrt(((-.6)^2 + .4^2 + (-.1)^2 + 0 + .3^2) / 5) = sqrt(0.124); each group keeps its own mean."""
    from dpok.core import group_advantages

    prompts = ["a", "a", "b", "b", "c", "b"]
    rewards = torch.tensor([0.0, 1.0, 0.5, 0.6, 0.9, float("nan")])
    std = 0.124 ** 0.5
    expected = torch.tensor([-0.5 / std, 0.5 / std, -0.05 / std, 0.05 / std, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(prompts, rewards, global_std=True), expected, atol=1e-5, rtol=0)
    own = group_advantages(prompts, rewards)  # each group's own std: both groups at +-1
    torch.testing.assert_close(own, torch.tensor([-1.0, 1.0, -1.0, 1.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    floored = group_advantages(prompts, rewards, std_floor=1.0, global_std=True)  # the floor still applies
    torch.testing.assert_close(floored, torch.tensor([-0.5, 0.5, -0.05, 0.05, 0.0, 0.0]), atol=1e-5, rtol=0)


def test_shuffled_minibatches_use_every_sample_once_before_any_twice() -> None:
    from dpok.algorithms.supervised import MinibatchDraw

    draw = MinibatchDraw(10, 4, shuffled=True, generator=torch.Generator().manual_seed(0))
    idx = torch.cat([draw.next() for _ in range(5)])  # 20 draws: two passes over the 10 samples
    assert sorted(idx[:10].tolist()) == list(range(10)) and sorted(idx[10:].tolist()) == list(range(10))
    assert idx[:10].tolist() != list(range(10))  # in a random order
    # with replacement: the independent draws of before (same generator, same numbers)
    old = torch.randint(0, 10, (4,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(MinibatchDraw(10, 4, shuffled=False, generator=torch.Generator().manual_seed(3)).next(), old)
