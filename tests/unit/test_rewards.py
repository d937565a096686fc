"""Tests of dpok.rewards: registry, spec parsing, output checks, built-in and custom rewards."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch

from dpok.embedded.alignment import AlignmentNet, AlignmentRewardModel
from dpok.rewards import (
    Reward,
    RewardError,
    RewardOutput,
    WeightedSum,
    available_rewards,
    jpeg_sizes_kb,
    load_custom_reward,
    make_reward,
    parse_reward_spec,
    register_reward,
)
from dpok.shapeworld import PromptError


class _Fixed(Reward):
    """Returns given scores whatever the images; the tests' stand-in for a real reward."""

    def __init__(self, values: object) -> None:
        self.values = values

    def _compute(self, images: torch.Tensor, prompts: list[str]) -> object:
        return self.values


class _Brightness(Reward):
    """Mean pixel value per image, in [0, 1]: simple, exactly computable scores."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def _compute(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.scale * images.mean(dim=(1, 2, 3))


@register_reward("test-rewards-brightness", "mean pixel value (tests only)")
def _brightness(scale: float = 1.0) -> Reward:
    return _Brightness(scale)


@register_reward("test-rewards-nan-first", "NaN for the first image, 1 for the rest (tests only)")
def _nan_first() -> Reward:
    class _NanFirst(Reward):
        def _compute(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
            out = torch.ones(images.shape[0])
            out[0] = float("nan")
            return out

    return _NanFirst()


def _images(b: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _prompts(b: int = 3) -> list[str]:
    return ["a red circle"] * b


# --- registry and specs -------------------------------------------------------------------------


def test_registry_lists_builtins_with_descriptions() -> None:
    names = available_rewards()
    for builtin in ("shapeworld-alignment", "jpeg-compressibility", "jpeg-incompressibility"):
        assert builtin in names
        assert names[builtin]  # a non-empty description


def test_unknown_reward_lists_valid_names_and_custom_form() -> None:
    with pytest.raises(RewardError) as info:
        make_reward("jpeg-compresibility")
    message = str(info.value)
    assert "'jpeg-compresibility'" in message
    assert "shapeworld-alignment" in message and "jpeg-incompressibility" in message
    assert "module:function" in message


def test_register_rejects_clash_and_bad_names() -> None:
    with pytest.raises(RewardError, match="already registered"):
        register_reward("jpeg-compressibility", "clash")(lambda: _Brightness())
    with pytest.raises(RewardError, match="invalid reward name"):
        register_reward("a+b", "bad")(lambda: _Brightness())


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("a", [(1.0, "a")]),
        ("a+0.1*b", [(1.0, "a"), (0.1, "b")]),
        ("2*a+-0.5*b", [(2.0, "a"), (-0.5, "b")]),
        (" 2 * a + b ", [(2.0, "a"), (1.0, "b")]),
        ("1e+3*a+1e-2*b", [(1000.0, "a"), (0.01, "b")]),
        ("mod.x:fn+3*b", [(1.0, "mod.x:fn"), (3.0, "b")]),
    ],
)
def test_parse_reward_spec(spec: str, expected: list[tuple[float, str]]) -> None:
    got = parse_reward_spec(spec)
    assert [n for _, n in got] == [n for _, n in expected]
    assert [w for w, _ in got] == pytest.approx([w for w, _ in expected])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("a++b", "empty term"),
        ("a+", "empty term"),
        ("x*a", "bad weight 'x'"),
        ("nan*a", "finite"),
        ("2*", "bad term"),
        ("2*3*a", "bad term"),
        ("a+-b", "-1\\*NAME"),
        ("", "empty reward spec"),
    ],
)
def test_parse_reward_spec_errors_quote_the_spec(spec: str, match: str) -> None:
    with pytest.raises(RewardError, match=match) as info:
        make_reward(spec)
    if spec:
        assert repr(spec) in str(info.value)


def test_weighted_sum_arithmetic_and_components() -> None:
    images = _images()
    reward = make_reward("2*test-rewards-brightness+-0.5*jpeg-compressibility")
    assert isinstance(reward, WeightedSum)
    out = reward(images, _prompts())
    brightness = images.mean(dim=(1, 2, 3))
    jpeg = -jpeg_sizes_kb(images)
    torch.testing.assert_close(out.scores, 2 * brightness - 0.5 * jpeg)
    assert set(out.components) == {"test-rewards-brightness", "jpeg-compressibility"}
    torch.testing.assert_close(out.components["test-rewards-brightness"], brightness)
    torch.testing.assert_close(out.components["jpeg-compressibility"], jpeg)
    assert out.valid.all()


def test_single_weighted_term_is_a_sum_and_duplicates_rejected() -> None:
    images = _images()
    out = make_reward("3*test-rewards-brightness")(images, _prompts())
    torch.testing.assert_close(out.scores, 3 * images.mean(dim=(1, 2, 3)))
    with pytest.raises(RewardError, match="more than once"):
        make_reward("test-rewards-brightness+2*test-rewards-brightness")


def test_weighted_sum_valid_is_and_of_parts() -> None:
    out = make_reward("test-rewards-nan-first+0*test-rewards-brightness")(_images(), _prompts())
    assert out.valid.tolist() == [False, True, True]
    assert out.scores[0].item() == 0.0 and math.isnan(out.raw[0].item())
    assert math.isnan(out.components["test-rewards-nan-first"][0].item())


def test_options_go_only_to_factories_that_accept_them() -> None:
    images = _images()
    out = make_reward("test-rewards-brightness", scale=10.0)(images, _prompts())
    torch.testing.assert_close(out.scores, 10 * images.mean(dim=(1, 2, 3)))
    # In a sum, the option reaches the part that takes it; the JPEG part never sees it.
    summed = make_reward("test-rewards-brightness+jpeg-compressibility", scale=10.0)(images, _prompts())
    torch.testing.assert_close(summed.components["test-rewards-brightness"], 10 * images.mean(dim=(1, 2, 3)))
    with pytest.raises(RewardError, match="alignment_model"):
        make_reward("jpeg-compressibility", alignment_model="/some/folder")
    make_reward("jpeg-compressibility", alignment_model=None)  # None means "default": dropped


def test_registered_reward_is_named_by_its_registry_name() -> None:
    assert make_reward("test-rewards-brightness").name == "test-rewards-brightness"


# --- the output contract ------------------------------------------------------------------------


def test_non_finite_scores_are_invalid_stored_as_zero_raw_kept() -> None:
    out = _Fixed([1.0, float("nan"), float("inf"), -float("inf")])(_images(4), _prompts(4))
    assert isinstance(out, RewardOutput)
    assert out.valid.tolist() == [True, False, False, False]
    assert out.scores.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert out.num_invalid == 3
    assert math.isnan(out.raw[1].item()) and out.raw[2].item() == math.inf and out.raw[3].item() == -math.inf
    assert out.scores.dtype == torch.float32 and out.valid.dtype == torch.bool


@pytest.mark.parametrize(
    "values",
    [[0.5, 0.25], np.array([0.5, 0.25]), torch.tensor([[0.5], [0.25]], dtype=torch.float64), (0.5, 0.25)],
)
def test_score_formats_are_converted(values: object) -> None:
    out = _Fixed(values)(_images(2), _prompts(2))
    assert out.scores.tolist() == [0.5, 0.25]
    assert out.scores.dtype == torch.float32 and out.components == {}


@pytest.mark.parametrize("values", [[1.0, 2.0], np.zeros((3, 2)), torch.zeros(4), 1.0, ["1", "2", "3"]])
def test_wrong_scores_raise_naming_the_reward(values: object) -> None:
    reward = _Fixed(values)
    reward.name = "my-reward"
    with pytest.raises(RewardError, match="'my-reward'"):
        reward(_images(3), _prompts(3))


def test_wrong_count_message() -> None:
    reward = _Fixed([1.0, 2.0])
    reward.name = "my-reward"
    with pytest.raises(RewardError, match="reward 'my-reward' returned 2 scores for 3 images"):
        reward(_images(3), _prompts(3))


def test_input_checks() -> None:
    reward = make_reward("test-rewards-brightness")
    with pytest.raises(RewardError, match="\\[0, 1\\].*test-rewards-brightness|test-rewards-brightness.*\\[0, 1\\]"):
        reward(_images() * 2 - 1, _prompts())
    with pytest.raises(RewardError, match="dtype"):
        reward((_images() * 255).to(torch.uint8), _prompts())
    with pytest.raises(RewardError, match="shape"):
        reward(torch.rand(3, 16, 16), _prompts())
    with pytest.raises(RewardError, match="3 images but 2 prompts"):
        reward(_images(), _prompts(2))
    with pytest.raises(RewardError, match="NaN"):
        reward(torch.full((1, 3, 4, 4), float("nan")), _prompts(1))
    # Rounding noise just outside [0, 1] is accepted and clamped away.
    out = reward(torch.full((1, 3, 4, 4), 1 + 5e-5), _prompts(1))
    assert out.scores.item() == 1.0


# --- built-in rewards ---------------------------------------------------------------------------


def test_jpeg_noise_is_bigger_than_flat_and_in_kb() -> None:
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = _images(1, 64)
    images = torch.cat([flat, noise])
    sizes = jpeg_sizes_kb(images)
    assert sizes[1] > 3 * sizes[0]
    # kB, not bytes: 64x64 noise at quality 95 is a few kB (it would be thousands in bytes).
    assert 1.0 < sizes[1].item() < 30.0 and 0.1 < sizes[0].item() < 2.0
    comp = make_reward("jpeg-compressibility")(images, _prompts(2))
    incomp = make_reward("jpeg-incompressibility")(images, _prompts(2))
    assert comp.scores[0] > comp.scores[1]
    torch.testing.assert_close(comp.scores, -sizes)
    torch.testing.assert_close(incomp.scores, sizes)


@pytest.fixture()
def tiny_alignment_dir(tmp_path):
    torch.manual_seed(0)
    folder = tmp_path / "alignment model"
    AlignmentRewardModel(AlignmentNet(width=16)).save(folder)
    return folder


def test_shapeworld_alignment_scores_in_unit_interval(tiny_alignment_dir) -> None:
    reward = make_reward("shapeworld-alignment", alignment_model=str(tiny_alignment_dir))
    prompts = ["a red circle", "two blue squares", "a green triangle left of a red circle"]
    out = reward(_images(3, 32), prompts)  # 32 px: the model resizes to 64
    assert out.scores.shape == (3,) and out.valid.all()
    assert ((out.scores >= 0) & (out.scores <= 1)).all()
    # Scores are the exponentiated log-probability of the loaded model.
    torch.testing.assert_close(out.scores, reward.log_prob(_images(3, 32), prompts).exp())
    reward.validate_prompts(prompts)
    with pytest.raises(PromptError, match="a red dog"):
        reward.validate_prompts(["a red circle", "a red dog"])


def test_shapeworld_alignment_missing_weights(tmp_path) -> None:
    reward = make_reward("shapeworld-alignment", alignment_model=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="dpok pretrain"):
        reward(_images(1), _prompts(1))


# --- custom rewards -----------------------------------------------------------------------------


@pytest.fixture()
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_test_rewards_mod.py").write_text(
        textwrap.dedent(
            """
            import numpy as np

            NOT_CALLABLE = 3

            def redness(images, prompts):
                return images[:, 0].mean(dim=(1, 2)).tolist()

            def numpy_scores(images, prompts):
                return np.arange(images.shape[0], dtype=np.float64)

            def too_few(images, prompts):
                return [1.0]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_test_rewards_mod"


def test_custom_reward_runs(custom_module: str) -> None:
    images = _images()
    reward = make_reward(f"{custom_module}:redness")
    assert reward.name == f"{custom_module}:redness"
    out = reward(images, _prompts())
    torch.testing.assert_close(out.scores, images[:, 0].mean(dim=(1, 2)))
    assert make_reward(f"{custom_module}:numpy_scores")(images, _prompts()).scores.tolist() == [0.0, 1.0, 2.0]
    summed = make_reward(f"0.5*{custom_module}:redness+test-rewards-brightness")(images, _prompts())
    assert set(summed.components) == {f"{custom_module}:redness", "test-rewards-brightness"}


def test_custom_reward_errors(custom_module: str) -> None:
    with pytest.raises(RewardError, match="'no_such_module_xyz'.*PYTHONPATH"):
        load_custom_reward("no_such_module_xyz:score")
    with pytest.raises(RewardError, match="no attribute 'missing'"):
        load_custom_reward(f"{custom_module}:missing")
    with pytest.raises(RewardError, match="not a function"):
        load_custom_reward(f"{custom_module}:NOT_CALLABLE")
    with pytest.raises(RewardError, match="expected 'package.module:function'"):
        load_custom_reward("just a name:")
    spec = f"{custom_module}:too_few"
    with pytest.raises(RewardError, match=f"reward '{spec}' returned 1 scores for 3 images"):
        make_reward(spec)(_images(), _prompts())


def test_custom_module_with_missing_dependency(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_test_rewards_broken.py").write_text("import not_installed_dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="needs 'not_installed_dep_xyz'"):
        load_custom_reward("my_test_rewards_broken:f")


def test_shapeworld_judge_reward_is_the_judge_verdict() -> None:
    """The oracle reward scores a render of its prompt 1 and the same render under another prompt 0."""
    from dpok.shapeworld import render_prompt

    image, _ = render_prompt("two white triangles", np.random.default_rng(0))
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
    reward = make_reward("shapeworld-judge")
    assert reward(x.repeat(2, 1, 1, 1), ["two white triangles", "three white triangles"]).scores.tolist() == [1.0, 0.0]
    with pytest.raises(PromptError, match="purple dogs"):
        reward.validate_prompts(["two purple dogs"])
