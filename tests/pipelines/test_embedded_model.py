"""The shipped ShapeWorld pipeline and alignment reward: loading, checksums, reward behaviour."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dpok.embedded.alignment import AlignmentNet, AlignmentRewardModel, alignment_log_prob, count_log_probs
from dpok.embedded.pretrain import to_tensor
from dpok.shapeworld import parse_prompt, render_prompt, render_scene, scene_for_prompt
from dpok.shapeworld.distribution import misaligned_variant


def test_count_distribution_is_the_poisson_binomial_of_the_cells() -> None:
    logits = torch.full((1, 25, 2, 2), -30.0)
    logits[0, 0] = 0.0  # background logit 0 everywhere
    logits[0, 1, 0, 0] = math.log(3.0)  # type 0 with p = 3/4 in one cell
    logits[0, 1, 1, 1] = 0.0  # and p = 1/2 in another
    probs = count_log_probs(logits).exp()[0, 0]
    expected = torch.tensor([0.25 * 0.5, 0.75 * 0.5 + 0.25 * 0.5, 0.75 * 0.5, 0.0, 0.0, 0.0])
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    assert count_log_probs(logits).exp()[0, 5, 0] > 0.999  # other types: count 0


def test_a_term_floor_gives_partial_credit_where_the_exact_log_reward_is_all_wrong() -> None:
    # two cells: a yellow square surely in one; the prompt asks for two yellow squares and a white triangle
    parsed = parse_prompt("two yellow squares and a white triangle")
    pairs = sorted(parsed.objects, key=lambda p: -parsed.objects[p])  # the pair of count two first
    from dpok.embedded.alignment import _PAIR_INDEX

    logits = torch.full((1, 25, 1, 2), -40.0)
    logits[0, 0] = 0.0
    logits[0, 1 + _PAIR_INDEX[pairs[0]], 0, 0] = 40.0  # the first named type, surely, in one cell only
    offsets = torch.full((1, 2, 1, 2), 0.5)
    exact = alignment_log_prob(logits, offsets, [parsed])
    floored = alignment_log_prob(logits, offsets, [parsed], term_floor=math.log(1e-3))
    # the exact log-reward is far below the floor's total; floored: each named type's term sits at the floor
    # (one object of a type that needs two, none of the other), every other type is surely absent (term 0)
    assert [parsed.objects[p] for p in pairs] == [2, 1]
    assert exact.item() < 2 * math.log(1e-3) - 10
    assert floored.item() == pytest.approx(2 * math.log(1e-3), abs=1e-3)


def test_alignment_model_width_is_checked() -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        AlignmentNet(width=8)


def test_corrupt_reward_weights_are_named(tmp_path: Path) -> None:
    AlignmentRewardModel(AlignmentNet(width=16)).save(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot load the alignment reward model"):
        AlignmentRewardModel.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="dpok pretrain"):
        AlignmentRewardModel.load(tmp_path / "nowhere")


def test_shipped_files_match_their_checksums(shipped_model_dir: Path, shipped_reward_dir: Path) -> None:
    for folder in (shipped_model_dir, shipped_reward_dir):
        lines = (folder / "SHA256SUMS").read_text().split("\n")
        entries = [line.split("  ", 1) for line in lines if line.strip()]
        assert any(name.endswith(".safetensors") for _, name in entries)
        for digest, name in entries:
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    sizes = sum(p.stat().st_size for p in shipped_model_dir.rglob("*.safetensors"))
    assert sizes <= 20e6 and not list(shipped_model_dir.rglob("*.bin")) and not list(shipped_model_dir.rglob("*.pt"))
    assert (shipped_reward_dir / "model.safetensors").stat().st_size <= 5e6


def test_shipped_pipeline_loads_offline_in_plain_diffusers(shipped_model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(shipped_model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a red circle", "two blue squares"], num_inference_steps=5, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (2, 64, 64, 3) and 0 <= out.min() and out.max() <= 1
    assert out.std() > 0.01  # not a blank image


def test_shipped_reward_ranks_the_right_render_above_wrong_ones(shipped_reward_dir: Path) -> None:
    model = AlignmentRewardModel.load(shipped_reward_dir)
    rng = np.random.default_rng(123)
    for prompt in ("a red circle", "three blue squares", "two yellow circles and a white square",
                   "a green triangle left of a cyan circle", "an orange triangle above a purple square"):
        parsed = parse_prompt(prompt)
        image = to_tensor([render_prompt(parsed, rng)[0]])
        right = model.score(image, [parsed]).item()
        assert right > 0.5, prompt
        for _ in range(5):
            wrong = misaligned_variant(parsed, rng)
            wrong_image = to_tensor([render_scene(scene_for_prompt(wrong, rng))])
            assert model.score(wrong_image, [parsed]).item() < right, (prompt, wrong.text())
            assert model.score(image, [wrong]).item() < 0.5, (prompt, wrong.text())


def test_shipped_reward_tells_four_from_five(shipped_reward_dir: Path) -> None:
    from dpok.shapeworld.render import place_objects

    model = AlignmentRewardModel.load(shipped_reward_dir)
    rng = np.random.default_rng(5)
    four = parse_prompt("four red circles")
    for n, aligned in ((3, False), (4, True), (5, False)):
        scenes = [s for s in (place_objects([("red", "circle")] * n, rng) for _ in range(20)) if s is not None][:8]
        scores = model.score(to_tensor([render_scene(s) for s in scenes]), [four] * len(scenes))
        assert bool((scores > 0.5).float().mean() > 0.5) == aligned, (n, scores)


def test_shipped_reward_is_not_fooled_by_blank_or_noise(shipped_reward_dir: Path) -> None:
    model = AlignmentRewardModel.load(shipped_reward_dir)
    gen = torch.Generator().manual_seed(0)
    images = torch.cat([torch.zeros(1, 3, 64, 64), torch.rand(3, 3, 64, 64, generator=gen)])
    prompts = [parse_prompt("a red circle")] * 4
    assert model.score(images, prompts).max() < 0.01


def test_the_log_alignment_reward_ranks_one_group_right_between_none_and_both() -> None:
    from dpok.rewards import make_reward

    prompt = "two yellow squares and a white triangle"
    rng = np.random.default_rng(0)
    whole, partial, wrong = [], [], []
    for _ in range(8):
        scene = scene_for_prompt(prompt, rng)
        whole.append(render_scene(scene))
        partial.append(render_scene([s for s in scene if s.color == "yellow"]))  # the squares, no triangle
        wrong.append(render_scene(scene_for_prompt("a red circle", rng)))
    images = to_tensor(whole + partial + wrong)
    prompts = [prompt] * len(images)
    exact = make_reward("shapeworld-alignment")(images, prompts).scores.view(3, 8)
    dense = make_reward("shapeworld-alignment-log")(images, prompts).scores.view(3, 8)
    assert exact[0].mean() > 0.5 and exact[1:].max() < 0.05  # r cannot tell one group right from none
    assert dense[0].mean() > dense[1].mean() + 3 > dense[2].mean() + 6  # the log form can, by ~log 1e3 a group
    assert dense.max() <= 0
