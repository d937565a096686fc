"""The settings that make RL learn, on a tiny random pipeline: LoRA loading, rollout KL, guided supervised
targets, the DPOK value warm-up and group advantages reaching its buffer."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from dpok.algorithms import ALGORITHMS
from dpok.config import build_config


def test_loaded_lora_is_the_models_lora(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    # review defect 1: load_lora left lora_config unset, so KL to base read 0 and reference() kept the LoRA
    from dpok.adapter import DiffusionAdapter
    from dpok.evaluate import SampleSettings, trajectory_kl
    from dpok.sampling import sample_trajectories

    trained = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    trained.add_lora(4, 4.0)
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(0.3 * torch.randn_like(p))
    trained.save_lora(tmp_path / "lora")
    loaded = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    loaded.load_lora(tmp_path / "lora")
    assert loaded.lora_config is not None
    settings = SampleSettings(2, 4, 3.0, 1.0)
    traj = sample_trajectories(loaded, ["a red circle"] * 2, 4, 1.0, 3.0, torch.Generator().manual_seed(0))
    kl_loaded = trajectory_kl(loaded, traj, settings)
    torch.testing.assert_close(kl_loaded, trajectory_kl(trained, traj, settings), rtol=1e-4, atol=1e-6)
    assert float(kl_loaded.min()) > 0
    base = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    x, t = traj.latents[:, 0], traj.timesteps[:1].expand(2)
    torch.testing.assert_close(loaded.noise_pred(x, t, traj.embeds, 3.0, reference=True),
                               base.noise_pred(x, t, traj.embeds, 3.0), rtol=1e-5, atol=1e-6)


def test_rollout_kl_is_of_the_sampling_policy_in_nats(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    # review defect 7: kl/rollout was per latent element and taken after the update
    from dpok.evaluate import SampleSettings, trajectory_kl
    from dpok.runlog import read_metrics
    from dpok.trainer import Trainer

    cfg = build_config(None, dict(model=str(tiny_pipeline_dir), reward="jpeg-compressibility", prompt=["a red circle"],
                                  rounds=2, samples_per_round=4, sample_batch_size=4, minibatch_size=4, num_steps=4,
                                  learning_rate=5e-2, eval_images=1, output_dir=str(tmp_path / "run"),
                                  device="cpu", surrogate="ppo", clip_range=0.5))
    trainer = Trainer(cfg)
    seen: list[float] = []
    original = trainer.rollout_kl

    def spy(traj):  # noqa: ANN001, ANN202
        value = original(traj)
        # the step means kept at sampling are the policy's: the same KL as evaluating the policy again
        assert traj.means is not None and traj.means.shape == (4, *traj.latents.shape[1:])
        settings = SampleSettings(4, cfg.num_steps, cfg.guidance_scale, cfg.eta)
        recomputed = dataclasses.replace(traj, means=None)
        expected = float(trajectory_kl(trainer.adapter, recomputed, settings, reduce="sum").mean())
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-9)
        seen.append(value)
        return value

    trainer.rollout_kl = spy
    trainer.run()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["kl/rollout"] == 0.0  # round 1 samples from the base policy: no KL yet
    assert rows[1]["kl/rollout"] == pytest.approx(seen[1]) and seen[1] > 0


def test_supervised_methods_train_the_guided_prediction(tiny_pipeline_dir: Path) -> None:
    # review defect 4: RWR fitted the unguided eps on guided samples, so guidance compounded each round
    from tests.pipelines.test_training import _context, _rollout, make_adapter, small_cfg

    # the conditional target is the unguided prediction: guidance scale 1
    for target, expected in (("guided", 3.0), ("conditional", 1.0)):
        adapter = make_adapter(tiny_pipeline_dir)
        cfg = small_cfg(algorithm="rwr", supervised_target=target, guidance_scale=3.0)
        algo = ALGORITHMS.create("rwr", _context(adapter, cfg))
        rollout = _rollout(adapter, cfg)
        scales: list[float] = []
        fn = adapter.noise_pred
        adapter.noise_pred = lambda x, t, e, w=1.0, _fn=fn, _s=scales, **k: (_s.append(w), _fn(x, t, e, w, **k))[1]
        algo.update(rollout)
        assert scales and set(scales) == {expected}


def test_lora_on_convolutions_reloads_in_plain_diffusers(tiny_pipeline_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    from dpok.adapter import DiffusionAdapter

    adapter = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    adapter.add_lora(8, 8.0, ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out"))
    convs = [n for n, p in adapter.unet.named_parameters() if p.requires_grad and "conv1" in n]
    assert convs, "no LoRA on the resnet convolutions"
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    adapter.save_lora(tmp_path / "lora")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500, 20])
    embeds = adapter.encode_prompts(["a red circle", "two blue squares"])
    with torch.no_grad():
        ours = adapter.unet(x, t, embeds.cond).sample
        theirs = pipe.unet(x, t, embeds.cond).sample
        base = adapter.noise_pred(x, t, embeds, reference=True)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(base, ours, atol=1e-3)


@pytest.mark.parametrize("value_first", [False, True])
def test_dpok_value_warmup_and_training_order(tiny_pipeline_dir: Path, value_first: bool) -> None:
    from tests.pipelines.test_training import _context, _rollout, make_adapter, small_cfg

    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(advantage="value", gradient_steps=2, value_steps=1, value_warmup_steps=3, value_first=value_first)
    algo = ALGORITHMS.create("dpok", _context(adapter, cfg))
    order: list[str] = []
    policy, value = algo._policy_step, algo._value_step
    algo._policy_step = lambda: (order.append("p"), policy())[1]
    algo._value_step = lambda: (order.append("v"), value())[1]
    algo.update(_rollout(adapter, cfg, 0))
    algo.update(_rollout(adapter, cfg, 1))
    if value_first:
        assert order == ["v"] * 3 + ["v", "p", "p"] + ["v", "p", "p"]
    else:
        assert order == ["v"] * 3 + ["p", "v", "p", "v"] + ["p", "v", "p", "v"]
    # the warm-up happens once: a resumed algorithm does not warm up again
    algo.load_state_dict(algo.state_dict())
    order.clear()
    algo.update(_rollout(adapter, cfg, 2))
    assert order.count("v") == (1 if value_first else 2)


def test_group_advantages_reach_the_dpok_buffer(tiny_pipeline_dir: Path) -> None:
    from dpok.algorithms.base import Rollout
    from tests.pipelines.test_training import _context, make_adapter, small_cfg

    adapter = make_adapter(tiny_pipeline_dir)
    cfg = small_cfg(advantage="group", step_window_end=0.5, num_steps=4)
    algo = ALGORITHMS.create("dpok", _context(adapter, cfg))
    from dpok.sampling import sample_trajectories

    prompts = ["a red circle", "a red circle", "two blue squares", "two blue squares"]
    traj = sample_trajectories(adapter, prompts, 4, 1.0, cfg.guidance_scale, torch.Generator().manual_seed(0),
                               logprob_reduce=cfg.logprob_reduce)
    rewards = torch.tensor([0.2, 0.8, 0.5, 0.1])
    algo.update(Rollout(traj, rewards, torch.ones(4, dtype=torch.bool)))
    buf = algo.buffer
    assert len(buf) == 4 * 2  # 4 trajectories x the first half of 4 steps
    assert set(buf.data["timesteps"][: len(buf)].tolist()) == set(traj.timesteps[:2].tolist())
    per_traj = buf.data["advantages"][: len(buf)].view(4, 2)[:, 0]
    torch.testing.assert_close(per_traj, torch.tensor([-1.0, 1.0, 1.0, -1.0]), atol=1e-4, rtol=1e-4)



def test_kept_step_means_are_the_policys_across_sampling_batches(tiny_pipeline_dir: Path) -> None:
    # the rollout KL reads mu_theta from the trajectory: the means kept must be those the policy gives
    # at the visited states, for the leading trajectories only, whichever batch they were sampled in
    from dpok.sampling import policy_step, sample_in_batches
    from tests.pipelines.test_training import make_adapter

    adapter = make_adapter(tiny_pipeline_dir)
    gen = torch.Generator().manual_seed(0)
    traj = sample_in_batches(adapter, ["a red circle", "a blue square"] * 3, 2, 3, 1.0, 3.0, gen, keep_means=3)
    assert traj.means is not None and traj.means.shape == (3, *traj.latents.shape[1:])
    with torch.no_grad():
        for i in range(traj.num_steps):
            x, t = traj.latents[:3, i], traj.timesteps[i].expand(3)
            dist, _ = policy_step(adapter, x, t, traj.embeds[torch.arange(3)], 3.0, 1.0, 3)
            torch.testing.assert_close(traj.means[:, i], dist.mean, rtol=1e-4, atol=1e-5)
    plain = sample_in_batches(adapter, ["a red circle"] * 2, 2, 3, 1.0, 3.0, torch.Generator().manual_seed(0))
    assert plain.means is None  # nothing kept unless asked
