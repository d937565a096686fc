"""The settings that make RL learn (group advantages, PPO surrogate, step window, guided supervised
targets) on hand-worked cases, and one test per defect found in review (each fails before its fix)."""

from __future__ import annotations

import statistics

import pytest
import torch

from dpok.algorithms.dpok import ReplayBuffer
from dpok.config import PRESETS, SD3_PAPER_TARGETS, TrainConfig, build_config
from dpok.core import (
    PerPromptStatTracker,
    dpok_loss,
    group_advantages,
    sft_kl_loss,
    sft_weights,
    step_window,
    trunk_advantages,
)

# ----------------------------------------------------------------------------- math core


def test_group_advantages_standardise_each_prompt_within_its_own_group() -> None:
    prompts = ["a", "b", "a", "b", "a", "c"]
    rewards = torch.tensor([1.0, 10.0, 2.0, 30.0, 3.0, 5.0])
    adv = group_advantages(prompts, rewards)
    sa, sb = statistics.pstdev([1.0, 2.0, 3.0]), statistics.pstdev([10.0, 30.0])
    expected = torch.tensor([-1 / sa, -10 / sb, 0.0, 10 / sb, 1 / sa, 0.0])  # "c" alone: no signal
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    for p in "ab":
        rows = torch.tensor([q == p for q in prompts])
        assert abs(float(adv[rows].mean())) < 1e-6


def test_group_advantages_ignore_non_finite_rewards() -> None:
    adv = group_advantages(["a"] * 4, torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0]), atol=1e-5, rtol=1e-5)
    assert torch.equal(group_advantages(["a", "a"], torch.tensor([2.0, 2.0])), torch.zeros(2))


def test_trunk_advantages_credit_each_group_mean_against_its_prompt() -> None:
    # prompt "a": two trunks of two branches (g1: 1, 0; g2: 1, 1); prompt "b": one trunk g3 and a
    # NaN reward; prompt "c": a single sample
    prompts = ["a", "a", "a", "a", "b", "b", "b", "c"]
    groups = ["g1", "g1", "g2", "g2", "g3", "g3", "g4", "g5"]
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.2, 0.6, float("nan"), 0.5])
    adv = trunk_advantages(prompts, groups, rewards)
    sa = statistics.pstdev([1.0, 0.0, 1.0, 1.0])  # mean 0.75
    expected = torch.tensor([(0.5 - 0.75) / sa] * 2 + [(1.0 - 0.75) / sa] * 2 + [0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    # trunk plus branch (the within-group part on the prompt's scale) is the plain group advantage
    branch = torch.tensor([0.5, -0.5, 0.0, 0.0]) / sa
    torch.testing.assert_close(adv[:4] + branch, group_advantages(prompts[:4], rewards[:4]), atol=1e-5, rtol=1e-5)
    # one trunk per prompt: every branch came from it, the trunk has nothing to be compared with
    assert torch.equal(trunk_advantages(["a"] * 3, ["g"] * 3, torch.tensor([0.0, 1.0, 0.5])), torch.zeros(3))
    with pytest.raises(ValueError, match="groups"):
        trunk_advantages(["a"], ["g", "h"], torch.tensor([1.0]))


def test_a_std_floor_keeps_near_equal_rewards_from_unit_scale_advantages() -> None:
    # a prompt the model cannot draw yet: rewards 0.001-0.004 (noise) in group "a"; a clear spread in "b"
    prompts = ["a"] * 4 + ["b"] * 2
    rewards = torch.tensor([0.001, 0.002, 0.003, 0.004, 0.2, 0.8])
    plain = group_advantages(prompts, rewards)
    floored = group_advantages(prompts, rewards, std_floor=0.1)
    sa = statistics.pstdev([0.001, 0.002, 0.003, 0.004])
    assert float(plain[:4].abs().max()) > 1.3  # the noise standardised to unit scale
    # (r - mean) / max(std, 0.1): -0.0015 / 0.1 ... 0.0015 / 0.1
    torch.testing.assert_close(floored[:4], torch.tensor([-0.015, -0.005, 0.005, 0.015]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(floored[4:], plain[4:])  # std 0.3 is above the floor: unchanged
    assert sa < 0.1
    # the tracker divides by the same floor
    tracker = PerPromptStatTracker(buffer_size=4, min_count=4, std_floor=0.1)
    torch.testing.assert_close(tracker.update(["a"] * 4, rewards[:4]), floored[:4], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="std_floor"):
        PerPromptStatTracker(std_floor=-1.0)
    with pytest.raises(ValueError, match="--adv-std-floor"):
        build_config(None, {"adv_std_floor": -0.1})
    assert build_config(None, {"adv_std_floor": 0.1}).policy_gradient.adv_std_floor == 0.1


def test_tracker_standardises_a_batch_larger_than_its_buffer_with_the_whole_batch() -> None:
    # review defect 6: 32 samples, buffer 16; halves with means 0.69 and 0.50 gave mean advantage 0.19
    tracker = PerPromptStatTracker(buffer_size=16, min_count=16)
    rewards = torch.cat([torch.full((16,), 0.69), torch.full((16,), 0.50)])
    rewards += torch.linspace(-0.01, 0.01, 32)
    adv = tracker.update(["p"] * 32, rewards)
    assert abs(float(adv.mean())) < 1e-5
    torch.testing.assert_close(adv, (rewards - rewards.mean()) / rewards.std(unbiased=False), atol=1e-4, rtol=1e-4)
    assert len(tracker.state_dict()["buffers"]["p"]) == 16  # the stored history is still the buffer's length


def test_dpok_ppo_surrogate_hand_cases() -> None:
    # ratios exp(log diff): inside the band, above it with A > 0, above it with A < 0, below with A > 0
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.05, 1.5, 1.5, 0.5])).requires_grad_()
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    kl = torch.zeros(4)
    loss, _ = dpok_loss(new, old, adv, kl, alpha=1.0, beta=0.0, clip_range=0.2, surrogate="ppo")
    # max(-A r, -A clip(r)): -1.05, -1.2 (clipped), 1.5 (unclipped: pulled back), -0.5 (unclipped)
    torch.testing.assert_close(loss, torch.tensor((-1.05 - 1.2 + 1.5 - 0.5) / 4))
    loss.backward()
    # d/dlogp of the unclipped terms is -A r / 4; the clipped one gives 0
    torch.testing.assert_close(new.grad, torch.tensor([-1.05, 0.0, 1.5, -0.5]) / 4)
    new.grad = None
    clamp, _ = dpok_loss(new, old, adv, kl, alpha=1.0, beta=0.0, clip_range=0.2, surrogate="clamp")
    clamp.backward()
    # DPOK's clamp: no gradient for any ratio outside the band, whatever the sign of A
    torch.testing.assert_close(new.grad, torch.tensor([-1.05, 0.0, 0.0, 0.0]) / 4)
    with pytest.raises(ValueError, match="surrogate"):
        dpok_loss(new, old, adv, kl, 1.0, 0.0, 0.2, surrogate="trpo")


def test_step_window_picks_fractions_of_the_trajectory() -> None:
    assert step_window(20).tolist() == list(range(20))
    assert step_window(20, 0.0, 0.75).tolist() == list(range(15))
    assert step_window(20, 0.5, 1.0).tolist() == list(range(10, 20))
    assert step_window(3, 0.0, 0.1).tolist() == [0]  # never empty
    assert step_window(4, 0.9, 1.0).tolist() == [3]
    with pytest.raises(ValueError, match="window"):
        step_window(10, 0.5, 0.5)


def test_sft_weights_are_never_negative_and_bound_the_loss_below() -> None:
    # review defect 3: raw negative rewards (ImageReward) made the SFT loss unbounded below
    rewards = torch.tensor([-2.0, -0.5, 1.0, float("nan")])
    w = sft_weights(rewards)
    torch.testing.assert_close(w, torch.tensor([0.0, 1.5, 3.0, 0.0]))
    assert torch.equal(sft_weights(torch.tensor([0.2, 0.9])), torch.tensor([0.2, 0.9]))  # [0, 1] rewards unchanged
    pred = (torch.randn(4, 2, 3, 3) * 100).requires_grad_()
    loss, _ = sft_kl_loss(pred, torch.zeros_like(pred), torch.zeros_like(pred), w, gamma=0.0)
    assert float(loss.detach()) >= 0.0


# ------------------------------------------------------------------------- review defects


def _transitions(start: int, n: int) -> dict[str, object]:
    """n transitions whose every field encodes the transition's number."""
    idx = torch.arange(start, start + n, dtype=torch.float32)
    lat = idx.view(-1, 1, 1, 1).expand(n, 2, 2, 2).clone()
    return dict(latents=lat, next_latents=lat + 0.5, timesteps=idx.long(), old_log_probs=-idx, rewards=idx * 10,
                prompts=[f"p{int(i)}" for i in idx], advantages=idx * 100)


def _check_buffer_consistent(buf: ReplayBuffer) -> set[int]:
    d = buf.data
    ids = set()
    for slot in range(buf.size):
        k = float(d["latents"][slot, 0, 0, 0])
        assert float(d["next_latents"][slot, 0, 0, 0]) == k + 0.5
        assert int(d["timesteps"][slot]) == int(k)
        assert float(d["old_log_probs"][slot]) == -k
        assert float(d["rewards"][slot]) == 10 * k
        assert float(d["advantages"][slot]) == 100 * k
        assert buf.prompts[int(d["prompt_ids"][slot])] == f"p{int(k)}"
        ids.add(int(k))
    return ids


def test_replay_buffer_never_pairs_fields_of_different_transitions() -> None:
    # review defect 2: a round larger than the capacity wrote duplicate indices (undefined in torch)
    torch.set_num_threads(2)
    buf = ReplayBuffer(capacity=100)
    buf.add(**_transitions(0, 30))
    buf.add(**_transitions(30, 1280))  # 64 x 20 > capacity: only the newest 100 survive
    assert len(buf) == 100
    assert _check_buffer_consistent(buf) == set(range(1210, 1310))
    buf.add(**_transitions(1310, 7))  # the ring goes on from where the big write ended
    assert _check_buffer_consistent(buf) == set(range(1217, 1317))
    state = buf.state_dict()
    restored = ReplayBuffer(100)
    restored.load_state_dict(state)
    assert _check_buffer_consistent(restored) == set(range(1217, 1317))


def test_presets_match_their_sources() -> None:
    # review defect 5: each value with where it comes from (see ../docs/tuning.md and ALGORITHMS.md)
    dpok = PRESETS["dpok-paper"]()
    sources = {  # DPOK paper App. / official code (google-research/dpok, train_online_pg.py)
        "alpha": 10.0, "beta": 0.01, "learning_rate": 1e-5, "samples_per_round": 10, "gradient_steps": 5,
        "grad_accum": 12, "minibatch_size": 4, "buffer_size": 1000, "clip_range": 1e-4, "max_grad_norm": 0.1,
        "value_lr": 1e-4, "num_steps": 50, "eta": 1.0, "guidance_scale": 7.5, "lora_rank": 4,
        "kl_form": "epsilon",  # beta 0.01 is tuned for the code's mean((eps - eps_pre)^2)
        "weight_decay": 0.0, "value_minibatch_size": 1280, "value_steps": 1, "value_first": True,
        "advantage": "value", "surrogate": "clamp", "logprob_reduce": "mean", "rounds": 2000,
        "lora_targets": "to_q,to_k,to_v,to_out.0",  # diffusers' attention processors, as both papers
        "lr_schedule": "constant",  # paper and code: a fixed learning rate
    }
    assert {k: dpok[k] for k in sources} == sources
    assert PRESETS["dpok-paper-multi"]()["alpha"] == 1000.0 and PRESETS["dpok-paper-multi"]()["beta"] == 0.1
    ddpo = PRESETS["ddpo-paper"]()
    sources = {  # DDPO config/dgx.py aesthetic(): 8 GPUs x 4 batches x 8 = 256 samples, 2 steps per epoch
        "learning_rate": 3e-4, "samples_per_round": 256, "inner_epochs": 1, "clip_range": 1e-4, "adv_clip": 5.0,
        "stat_buffer": 32, "stat_min_count": 16, "num_steps": 50, "eta": 1.0, "guidance_scale": 5.0,
        "max_grad_norm": 1.0, "rounds": 200, "weight_decay": 1e-4, "advantage": "tracker",
        "timestep_fraction": 1.0, "logprob_reduce": "mean", "lora_rank": 4, "lora_targets": "to_q,to_k,to_v,to_out.0",
        "lr_schedule": "constant",  # config/base.py: a fixed learning rate
    }
    assert {k: ddpo[k] for k in sources} == sources
    # 256 samples in minibatches of 4 with 32 accumulated: 2 optimizer steps per round
    assert ddpo["samples_per_round"] // (ddpo["minibatch_size"] * ddpo["grad_accum"]) == 2
    sft = PRESETS["sft-kl-paper"]()
    assert {k: sft[k] for k in ("gamma", "learning_rate", "minibatch_size", "lr_schedule")} == {
        "gamma": 2.0, "learning_rate": 2e-5, "minibatch_size": 128, "lr_schedule": "constant"}
    grpo = PRESETS["flow-grpo-paper"]()
    sources = {  # flow_grpo config/grpo.py geneval_sd3 + base.py; train_sd3.py (LoRA r 32, alpha 64, mean log-probs)
        "samples_per_prompt": 24, "samples_per_round": 48 * 24, "num_steps": 10, "guidance_scale": 4.5,
        "timestep_fraction": 0.99, "beta": 0.04, "clip_range": 1e-4, "adv_clip": 5.0, "learning_rate": 3e-4,
        "weight_decay": 1e-4, "max_grad_norm": 1.0, "inner_epochs": 1, "ema_decay": 0.9, "lora_rank": 32,
        "lora_alpha": 64.0, "logprob_reduce": "mean", "lr_schedule": "constant",
        "adv_global_std": True,  # grpo.py geneval_sd3: sample.global_std
    }
    assert {k: grpo[k] for k in sources} == sources
    # base.py: sample.noise_level 0.7 (the SDE's a) on flow models; train_sd3.py: LoRA on both attention streams
    assert grpo["flow_overrides"] == {"eta": 0.7, "lora_targets": SD3_PAPER_TARGETS}
    assert grpo["samples_per_round"] // (grpo["minibatch_size"] * grpo["grad_accum"]) == 2  # two steps per epoch
    nft = PRESETS["diffusion-nft-paper"]()
    sources = {  # DiffusionNFT config/nft.py sd3_geneval + base.py; train_nft_sd3.py
        "nft_beta": 1.0, "nft_decay_rate": 0.001, "nft_decay_max": 0.5,  # decay_type 1
        "guidance_scale": 1.0, "rollout_eta": 0.0, "rollout_steps": 10, "num_steps": 40, "beta": 1e-4,
        "samples_per_prompt": 24, "samples_per_round": 48 * 24, "adv_clip": 5.0, "learning_rate": 3e-4,
        "weight_decay": 1e-4, "max_grad_norm": 1.0, "ema_decay": 0.9, "lora_rank": 32, "lora_alpha": 64.0,
        "supervised_target": "conditional", "lr_schedule": "constant", "adv_global_std": True,
        "minibatch_draw": "shuffled",
        "nft_train_steps": 9,  # int(sample.num_steps 10 x train.timestep_fraction 0.99) timesteps per sample
        "rollout_solver": "dpm-solver++",  # nft.py: sample.solver "dpm2", deterministic
    }
    assert {k: nft[k] for k in sources} == sources
    assert nft["flow_overrides"] == {"lora_targets": SD3_PAPER_TARGETS}  # train_nft_sd3.py's target modules
    assert sorted(SD3_PAPER_TARGETS.split(",")) == ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                                            "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
    assert nft["samples_per_round"] == nft["minibatch_size"] * nft["grad_accum"]  # one step per epoch
    for name in PRESETS:
        build_config(name, {})  # every preset validates


def test_group_advantages_need_groups_in_the_round() -> None:
    cfg = TrainConfig.from_options(samples_per_round=32)
    assert cfg.group_size() == 8 and cfg.group_size(num_processes=2) == 8
    assert TrainConfig.from_options(samples_per_round=12, sample_batch_size=12).group_size() == 4
    with pytest.raises(ValueError, match="samples-per-prompt"):
        TrainConfig.from_options(samples_per_round=32, samples_per_prompt=5).validate()
    with pytest.raises(ValueError, match="advantage value"):
        TrainConfig.from_options(algorithm="ddpo-is", advantage="value").validate()


def test_prompt_sampler_draws_groups() -> None:
    from dpok.prompts import PromptSampler

    prompts = PromptSampler(["a", "b", "c"], seed=1).sample_groups(12, 4)
    assert len(prompts) == 12 and all(len(set(prompts[i : i + 4])) == 1 for i in range(0, 12, 4))


# ------------------------------------------------------------------ defects on a pipeline












