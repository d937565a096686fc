"""ShapeWorld: grammar, renderer, pretraining distribution, geometric judge (pure, fast)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from dpok.shapeworld import (
    ALL_PAIRS,
    COLORS,
    HELD_OUT_PAIRS,
    RARE_PAIRS,
    Group,
    ParsedPrompt,
    PromptError,
    format_prompt,
    parse_prompt,
    prompt_sets,
    render_prompt,
    render_scene,
    sample_caption,
    scene_for_prompt,
    scene_matches,
)
from dpok.shapeworld.distribution import misaligned_variant, sample_labelled_scene
from dpok.shapeworld.judge import FLAWS, flaws, is_aligned, judge
from dpok.shapeworld.render import BORDER, GAP, MAX_SIZE, MIN_SIZE, Shape, relation_holds


@pytest.mark.parametrize("prompt, objects, relation", [
    ("a red circle", {("red", "circle"): 1}, None),
    ("an orange square", {("orange", "square"): 1}, None),
    ("four white triangles", {("white", "triangle"): 4}, None),
    ("two red circles and a blue square", {("red", "circle"): 2, ("blue", "square"): 1}, None),
    ("a green triangle left of a cyan circle", {("green", "triangle"): 1, ("cyan", "circle"): 1}, "left of"),
    ("an orange circle above a purple square", {("orange", "circle"): 1, ("purple", "square"): 1}, "above"),
])
def test_parse_known_prompts(prompt: str, objects: dict, relation: str | None) -> None:
    parsed = parse_prompt(prompt)
    assert dict(parsed.objects) == objects
    assert parsed.relation == relation
    assert parsed.text() == prompt


def test_every_caption_round_trips() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        parsed = sample_caption(rng, biased=False)
        assert parse_prompt(parsed.text()) == parsed
        assert format_prompt(parsed.groups, parsed.relation) == parsed.text()


@pytest.mark.parametrize("prompt, fragment", [
    ("a red dog", "unknown shape"),
    ("a magenta circle", "unknown color"),
    ("five red circles", "unknown count"),
    ("a orange circle", "use 'an'"),
    ("an red circle", "use 'a'"),
    ("two red circle", "plural"),
    ("A red circle", "lower-case"),
    ("a red circle.", "trailing period"),
    ("a red circle  ", "whitespace"),
    ("four red circles and a blue square", "1 to 3"),
    ("a red circle and two red circles", "different"),
    ("two red circles left of a blue square", "one object"),
    ("a red circle left of a red circle", "different"),
    ("", "expected"),
])
def test_parse_errors_are_clear(prompt: str, fragment: str) -> None:
    with pytest.raises(PromptError) as err:
        parse_prompt(prompt)
    assert fragment in str(err.value)
    assert repr(prompt) in str(err.value)


def test_renderer_is_deterministic_under_a_seed() -> None:
    a, scene_a = render_prompt("three blue squares", np.random.default_rng(7))
    b, scene_b = render_prompt("three blue squares", np.random.default_rng(7))
    c, _ = render_prompt("three blue squares", np.random.default_rng(8))
    assert scene_a == scene_b and np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8


def test_render_geometry_sizes_gaps_border_and_background() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = sample_labelled_scene(rng)
        img = render_scene(scene)
        covered = np.zeros((64, 64), bool)
        for s in scene:
            assert MIN_SIZE <= s.size <= MAX_SIZE
            assert s.x0 >= BORDER and s.y0 >= BORDER and s.x0 + s.size <= 64 - BORDER and s.y0 + s.size <= 64 - BORDER
            covered[s.y0 : s.y0 + s.size, s.x0 : s.x0 + s.size] = True
            for o in scene:
                if o is not s:
                    apart_x = o.x0 >= s.x0 + s.size + GAP or s.x0 >= o.x0 + o.size + GAP
                    apart_y = o.y0 >= s.y0 + s.size + GAP or s.y0 >= o.y0 + o.size + GAP
                    assert apart_x or apart_y
        assert img[~covered].max(initial=0) == 0  # uniform black background


def test_shape_pixels_have_the_palette_colour_and_expected_fill() -> None:
    for shape, fill in (("square", 1.0), ("circle", np.pi / 4), ("triangle", 0.5)):
        s = Shape("purple", shape, 10, 10, 16)
        img = render_scene((s,))
        box = img[10:26, 10:26].astype(float)
        coverage = box.max(-1) / max(COLORS["purple"])
        assert abs(coverage.mean() - fill) < 0.03
        assert tuple(box[8, 8].astype(int)) == COLORS["purple"]  # the centre is flat-filled


def test_relation_prompts_render_with_the_relation() -> None:
    rng = np.random.default_rng(2)
    for relation in ("left of", "above"):
        parsed = parse_prompt(f"a red circle {relation} a blue square")
        for _ in range(50):
            scene = scene_for_prompt(parsed, rng)
            a = next(s for s in scene if s.pair == ("red", "circle"))
            b = next(s for s in scene if s.pair == ("blue", "square"))
            assert relation_holds(a, b, relation)
            assert scene_matches(scene, parsed)


def test_pretraining_distribution_follows_the_world_file() -> None:
    rng = np.random.default_rng(3)
    captions = [sample_caption(rng) for _ in range(20000)]
    forms = Counter(c.form for c in captions)
    assert abs(forms["one-group"] / 20000 - 0.65) < 0.015
    assert abs(forms["relation"] / 20000 - 0.10) < 0.01
    counts = Counter(c.groups[0].count for c in captions if c.form == "one-group")
    n = sum(counts.values())
    assert abs(counts[4] / n - 0.05) < 0.01 and abs(counts[1] / n - 0.5) < 0.02
    pairs = Counter(g.pair for c in captions for g in c.groups)
    assert all(pairs[p] == 0 for p in HELD_OUT_PAIRS)
    common = np.mean([pairs[p] for p in ALL_PAIRS if p not in RARE_PAIRS + HELD_OUT_PAIRS])
    rare = np.mean([pairs[p] for p in RARE_PAIRS])
    assert 1 / 30 < rare / common < 1 / 14


def test_named_prompt_sets_parse_and_unseen_is_disjoint_from_seen() -> None:
    sets = prompt_sets()
    assert not set(sets["seen"]) & set(sets["unseen"])
    assert all(parse_prompt(p).objects for ps in sets.values() for p in ps)
    assert all(any(g.pair in HELD_OUT_PAIRS for g in parse_prompt(p).groups) for p in sets["heldout"])


def test_judge_is_exact_on_clean_renders_of_every_form() -> None:
    rng = np.random.default_rng(4)
    for _ in range(300):
        parsed = sample_caption(rng, biased=False)
        img, _ = render_prompt(parsed, rng)
        assert is_aligned(img, parsed), parsed.text()
        assert judge(img).clean


def test_judge_catches_a_removed_recoloured_or_moved_object() -> None:
    rng = np.random.default_rng(5)
    parsed = parse_prompt("two red circles and a blue square")
    scene = scene_for_prompt(parsed, rng)
    assert is_aligned(render_scene(scene), parsed)
    assert not is_aligned(render_scene(scene[1:]), parsed)  # removed
    s = scene[0]
    recoloured = (Shape("green", s.shape, s.x0, s.y0, s.size), *scene[1:])
    assert not is_aligned(render_scene(recoloured), parsed)
    rel = parse_prompt("a red circle left of a blue square")
    a = Shape("red", "circle", 40, 20, 12)
    b = Shape("blue", "square", 10, 20, 12)
    assert not is_aligned(render_scene((a, b)), rel)  # moved to the wrong side
    assert is_aligned(render_scene((Shape("red", "circle", 10, 20, 12), Shape("blue", "square", 40, 20, 12))), rel)


def test_judge_names_each_flaw_of_a_misaligned_image() -> None:
    parsed = parse_prompt("two white triangles")
    one, two, three = (Shape("white", "triangle", x, 20, 14) for x in (4, 24, 44))
    assert flaws(render_scene((one, two)), parsed) == frozenset()
    assert flaws(render_scene((one,)), parsed) == {"missing"}
    assert flaws(render_scene((one, two, three)), parsed) == {"extra"}
    assert flaws(render_scene((one, two, Shape("red", "circle", 44, 20, 14))), parsed) == {"foreign"}
    # a recoloured one: one white triangle short and an orange one the prompt does not name
    assert flaws(render_scene((one, Shape("orange", "triangle", 24, 20, 14))), parsed) == {"missing", "foreign"}
    grey = render_scene((one, two))
    grey[40:54, 40:54] = 128  # a square of no palette colour
    assert flaws(grey, parsed) == {"unrecognised"}
    rel = parse_prompt("a red circle left of a blue square")
    wrong_side = render_scene((Shape("red", "circle", 40, 20, 12), Shape("blue", "square", 10, 20, 12)))
    assert flaws(wrong_side, rel) == {"relation"}
    assert flaws(np.zeros((64, 64, 3), np.uint8), "a red circle") == {"missing"}
    assert set(FLAWS) == {"missing", "extra", "foreign", "unrecognised", "relation"}


def test_flaws_are_empty_exactly_when_aligned() -> None:
    rng = np.random.default_rng(8)
    for _ in range(200):
        parsed = sample_caption(rng, biased=False)
        img = render_scene(scene_for_prompt(parsed, rng))
        wrong = misaligned_variant(parsed, rng)
        assert flaws(img, parsed) == frozenset() and is_aligned(img, parsed)
        assert flaws(img, wrong) and not is_aligned(img, wrong), wrong.text()


def test_judge_rejects_noise_and_blank_images() -> None:
    rng = np.random.default_rng(6)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not judge(noise).clean
    assert not is_aligned(noise, "a red circle")
    assert not is_aligned(np.zeros((64, 64, 3), np.uint8), "a red circle")


def test_misaligned_variants_are_false_of_aligned_scenes() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        parsed = sample_caption(rng, biased=False)
        wrong = misaligned_variant(parsed, rng)
        scene = scene_for_prompt(parsed, rng)
        assert scene_matches(scene, parsed) and not scene_matches(scene, wrong)
        assert isinstance(wrong, ParsedPrompt) and parse_prompt(wrong.text()) == wrong


def test_group_text_uses_an_before_vowels() -> None:
    assert Group(1, "orange", "circle").text() == "an orange circle"
    assert Group(3, "orange", "circle").text() == "three orange circles"


def test_frechet_distance_is_near_zero_for_renders_and_large_for_noise() -> None:
    from dpok.shapeworld.quality import frechet_distance, image_features

    rng = np.random.default_rng(9)
    prompt = "two blue squares"
    renders_a = np.stack([image_features(render_prompt(prompt, rng)[0]) for _ in range(64)])
    renders_b = np.stack([image_features(render_prompt(prompt, rng)[0]) for _ in range(64)])
    noise = np.stack([image_features(rng.random((64, 64, 3))) for _ in range(64)])
    other = np.stack([image_features(render_prompt("three red circles", rng)[0]) for _ in range(64)])
    same = frechet_distance(renders_a, renders_b)
    assert same < 0.05
    assert frechet_distance(renders_a, noise) > 100 * max(same, 1e-3)
    assert frechet_distance(renders_a, other) > 10 * max(same, 1e-3)


def test_eval_table_says_why_images_were_misaligned() -> None:
    from dpok.evaluate import flaw_lines, format_table

    row = {"reward_mean": 0.5, "reward_std": 0.1, "judge_aligned": 0.5, "clean_share": 1.0,
           "judge_missing": 0.25, "judge_extra": 0.125, "judge_foreign": 0.0, "judge_unrecognised": 0.0,
           "judge_relation": 0.0}
    result = {"splits": {"seen": {"prompts": {"two white triangles": row}, "reward_mean": 0.5}}}
    table = format_table(result)
    header, line = table.splitlines()[-2:]
    assert header.split()[2:] == ["extra", "foreign", "missing", "relation", "unrecognised"]
    assert line.split()[-5:] == ["0.125", "0.000", "0.250", "0.000", "0.000"]
    # a domain without a judge's flaws (a plain text-to-image model) adds nothing
    plain = {"splits": {"seen": {"prompts": {"a cat": {"reward_mean": 0.5, "reward_std": 0.1}}, "reward_mean": 0.5}}}
    assert flaw_lines(plain) == [] and "why misaligned" not in format_table(plain)
