"""--shared-noise (DanceGRPO): each group of k samples of a prompt starts from one initial noise x_T
and its advantages are standardised within that group; --branch-step: the group also shares its
first steps (a tree rollout), credited with the group's mean reward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpok.algorithms import Rollout
from dpok.algorithms.base import trajectory_advantages
from dpok.config import build_config
from dpok.core import PerPromptStatTracker


def test_groups_share_their_initial_noise_across_sampling_batches(tiny_pipeline_dir: Path) -> None:
    from dpok.adapter import DiffusionAdapter
    from dpok.sampling import sample_in_batches

    adapter = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    prompts = ["a red circle"] * 6
    # batches of 4 split the second group of 3 (rows 3-5) over two batches
    traj = sample_in_batches(adapter, prompts, 4, 3, 1.0, 3.0, torch.Generator().manual_seed(0), shared_noise=3)
    x_t = traj.latents[:, 0]
    for group in (slice(0, 3), slice(3, 6)):
        rows = x_t[group]
        assert all(torch.equal(rows[0], r) for r in rows[1:])
    assert not torch.equal(x_t[0], x_t[3])
    # the steps' noise is the samples' own: the images of a group differ
    assert not torch.equal(traj.final_latents[0], traj.final_latents[1])
    plain = sample_in_batches(adapter, prompts, 4, 3, 1.0, 3.0, torch.Generator().manual_seed(0))
    assert not torch.equal(plain.latents[0, 0], plain.latents[1, 0])
    with pytest.raises(ValueError, match="groups of 4"):
        sample_in_batches(adapter, prompts, 4, 3, 1.0, 3.0, torch.Generator().manual_seed(0), shared_noise=4)


def test_group_advantages_are_taken_within_each_noise_group() -> None:
    prompts = ["p"] * 4
    rewards = torch.tensor([1.0, 0.0, 0.9, 0.9])
    rollout_groups = ["p#0", "p#0", "p#1", "p#1"]
    tracker = PerPromptStatTracker(4, 1)
    by_group = trajectory_advantages("group", tracker, prompts, rewards, torch.ones(4, dtype=torch.bool), 5.0,
                                     groups=rollout_groups)
    # (1, 0) standardised on its own: +-1; a group of equal rewards says nothing: 0
    torch.testing.assert_close(by_group, torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-4, rtol=0)
    by_prompt = trajectory_advantages("group", tracker, prompts, rewards, torch.ones(4, dtype=torch.bool), 5.0)
    assert by_prompt[2] > 0 and by_prompt[1] < -1  # one group of four: 0.9 is above the mean 0.7
    # the tracker keeps its history per prompt whatever the groups
    t1, t2 = PerPromptStatTracker(4, 1), PerPromptStatTracker(4, 1)
    valid = torch.ones(4, dtype=torch.bool)
    torch.testing.assert_close(trajectory_advantages("tracker", t1, prompts, rewards, valid, 5.0, groups=rollout_groups),
                               trajectory_advantages("tracker", t2, prompts, rewards, valid, 5.0))
    assert Rollout(None, rewards, valid, rollout_groups).advantage_groups == rollout_groups  # type: ignore[arg-type]


@pytest.mark.parametrize(("settings", "message"), [
    ({"algorithm": "rwr"}, "not --algorithm rwr"),
    ({"advantage": "tracker"}, "needs --advantage group"),
    ({"samples_per_prompt": 1}, "groups of at least 2"),
    ({"algorithm": "diffusion-nft", "rollout_eta": 0.0, "rollout_steps": 4}, "deterministic rollouts"),
])
def test_shared_noise_settings_are_checked_before_loading(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_config(None, {"shared_noise": True, "model": "no-such-model-folder", **settings})


@pytest.mark.parametrize(("algorithm", "module"), [("dpok", "base"), ("grpo", "base"), ("ddpo-sf", "base"),
                                                 ("diffusion-nft", "nft")])
def test_a_round_with_shared_noise_trains_on_per_noise_groups(tiny_pipeline_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, algorithm: str,
                                                              module: str) -> None:
    import importlib

    from dpok.trainer import Trainer

    cfg = build_config(None, dict(model=str(tiny_pipeline_dir), reward="jpeg-compressibility", prompt=["a red circle"],
                                  algorithm=algorithm, rounds=1, samples_per_round=8, samples_per_prompt=4,
                                  sample_batch_size=4, num_steps=3, eval_images=1, output_dir=str(tmp_path / "run"),
                                  device="cpu", shared_noise=True))
    trainer = Trainer(cfg)
    seen: list[Rollout] = []
    advantages: list[tuple[list[str] | None, torch.Tensor]] = []
    update = trainer.algorithm.update
    target = importlib.import_module(f"dpok.algorithms.{module}")
    real = target.trajectory_advantages

    def spy_update(rollout: Rollout):  # noqa: ANN202
        seen.append(rollout)
        return update(rollout)

    def spy_advantages(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        out = real(*args, **kwargs)
        advantages.append((args[7] if len(args) > 7 else kwargs.get("groups"), out))
        return out

    monkeypatch.setattr(target, "trajectory_advantages", spy_advantages)
    trainer.algorithm.update = spy_update  # type: ignore[method-assign]
    trainer.run()
    (rollout,) = seen
    x_t = rollout.trajectory.latents[:, 0]
    assert torch.equal(x_t[0], x_t[3]) and not torch.equal(x_t[3], x_t[4])
    assert len(set(rollout.advantage_groups)) == 2 and rollout.advantage_groups[:4] == [rollout.advantage_groups[0]] * 4
    # the algorithm standardised within each group of one x_T: every group's advantages average 0
    (groups, adv), = advantages
    assert groups == rollout.advantage_groups
    for half in (adv[:4], adv[4:]):
        assert abs(float(half.mean())) < 1e-4 and float(half.abs().max()) > 0
    assert (tmp_path / "run" / "lora").is_dir()


def test_without_shared_noise_the_groups_are_the_prompts() -> None:
    from types import SimpleNamespace

    traj = SimpleNamespace(prompts=["a", "a", "b"])
    rollout = Rollout(traj, torch.zeros(3), torch.ones(3, dtype=torch.bool))  # type: ignore[arg-type]
    assert rollout.groups is None and rollout.advantage_groups == ["a", "a", "b"]


def test_branching_groups_share_their_first_steps_then_go_their_own_ways(tiny_pipeline_dir: Path) -> None:
    from dpok.adapter import DiffusionAdapter
    from dpok.sampling import sample_in_batches

    adapter = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    prompts = ["a red circle"] * 3 + ["two blue squares"] * 3
    # batches of 4 split the second group over two batches; branch after 2 of 4 steps
    traj = sample_in_batches(adapter, prompts, 4, 4, 1.0, 3.0, torch.Generator().manual_seed(0), shared_noise=3,
                             branch_step=2, keep_means=5)
    assert traj.latents.shape[:2] == (6, 4) and traj.log_probs.shape == (6, 4) and traj.means.shape[:2] == (5, 4)
    assert torch.equal(traj.timesteps, adapter.timesteps(4))
    assert torch.equal(traj.latents[:, 1:], traj.next_latents[:, :-1])  # one unbroken chain per sample
    for group in (slice(0, 3), slice(3, 6)):
        for field in (traj.latents[group, :3], traj.next_latents[group, :2], traj.log_probs[group, :2]):
            assert all(torch.equal(field[0], f) for f in field[1:])  # the trunk: steps 0-1 and the state x_2
        assert not torch.equal(traj.next_latents[group][0, 2], traj.next_latents[group][1, 2])  # then branches
    assert torch.equal(traj.means[0, :2], traj.means[1, :2]) and not torch.equal(traj.means[0, 2:], traj.means[1, 2:])
    assert not torch.equal(traj.latents[0, 1], traj.latents[3, 1])
    # the log-probs of every step, trunk included, are the policy's own
    from dpok.sampling import evaluate_log_probs

    n, t = traj.batch_size, traj.num_steps
    with torch.no_grad():
        again, _, _ = evaluate_log_probs(adapter, traj.latents.flatten(0, 1), traj.next_latents.flatten(0, 1),
                                         traj.timesteps.repeat(n), traj.embeds[torch.arange(n).repeat_interleave(t)],
                                         3.0, 1.0, 4, "sum")
    torch.testing.assert_close(again.view(n, t), traj.log_probs, atol=1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="branch_step needs groups"):
        sample_in_batches(adapter, prompts, 4, 4, 1.0, 3.0, torch.Generator().manual_seed(0), branch_step=2)


@pytest.mark.parametrize(("settings", "message"), [
    ({"shared_noise": False}, "needs --shared-noise"),
    ({"num_steps": 4, "branch_step": 4}, "below --num-steps"),
    ({"algorithm": "diffusion-nft"}, "trains on the final images"),
    ({"branch_step": -1}, "--branch-step must be >= 0"),
])
def test_branch_settings_are_checked_before_loading(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_config(None, {"shared_noise": True, "branch_step": 2, "model": "no-such-model-folder", **settings})


@pytest.mark.parametrize("algorithm", ["dpok", "grpo"])
def test_a_round_with_branching_credits_the_trunk_with_its_groups_mean(tiny_pipeline_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      algorithm: str) -> None:
    import importlib

    from dpok.trainer import Trainer

    cfg = build_config(None, dict(model=str(tiny_pipeline_dir), reward="jpeg-compressibility", prompt=["a red circle"],
                                  algorithm=algorithm, rounds=1, samples_per_round=8, samples_per_prompt=4,
                                  sample_batch_size=4, num_steps=4, eval_images=1, output_dir=str(tmp_path / "run"),
                                  device="cpu", shared_noise=True, branch_step=2))
    trainer = Trainer(cfg)
    module = importlib.import_module("dpok.algorithms." + ("dpok" if algorithm == "dpok" else "ddpo"))
    real, seen = module.step_advantages, []

    def spy(pg, tracker, rollout):  # noqa: ANN001, ANN202
        seen.append((rollout, real(pg, tracker, rollout)))
        return seen[-1][1]

    monkeypatch.setattr(module, "step_advantages", spy)
    trainer.run()
    ((rollout, adv),) = seen
    assert adv.shape == (8, 4)
    r = rollout.rewards.double()
    spread = float(r.std(unbiased=False))
    for group in (slice(0, 4), slice(4, 8)):
        trunk, own = adv[group, :2], adv[group, 2:]
        # the trunk's steps: one value for the whole group, its mean reward against the prompt's
        assert torch.allclose(trunk, trunk[0, 0].expand_as(trunk))
        assert float(trunk[0, 0]) == pytest.approx(float(r[group].mean() - r.mean()) / spread, rel=1e-3, abs=1e-4)
        # the branches' steps: each sample against its own group, one value along its steps
        assert torch.allclose(own, own[:, :1].expand_as(own)) and abs(float(own[:, 0].mean())) < 1e-4
    assert (tmp_path / "run" / "lora").is_dir()
