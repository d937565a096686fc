"""--shared-noise (DanceGRPO): each group of k samples of a prompt starts from one initial noise x_T
and its advantages are standardised within that group."""

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


@pytest.mark.parametrize(("algorithm", "module"), [("dpok", "dpok"), ("grpo", "ddpo"), ("ddpo-sf", "ddpo"),
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
