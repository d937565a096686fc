"""The deliberately biased pretraining caption distribution and the named prompt sets.

Mix (SHAPEWORLD.md): form one group 65 %, two groups 25 %, relation 10 %; one-group counts
1/2/3/4 at 50/30/15/5 %; (color, shape) pairs uniform except the RARE pairs at 1/20 of a common
pair's weight and the HELD_OUT pairs at 0. Two-group counts 1/2/3 follow the one-group weights
renormalised to 1-3 (the world file leaves them open).
"""

from __future__ import annotations

import numpy as np

from .grammar import ALL_PAIRS, COLORS, RELATIONS, SHAPES, Group, Pair, ParsedPrompt, parse_prompt
from .render import Scene, place_objects, render_scene, scene_for_prompt

RARE_PAIRS: tuple[Pair, ...] = (
    ("green", "triangle"),
    ("purple", "circle"),
    ("yellow", "square"),
    ("white", "triangle"),
)
HELD_OUT_PAIRS: tuple[Pair, ...] = (
    ("orange", "triangle"),
    ("cyan", "square"),
    ("blue", "triangle"),
)
COMMON_PAIRS: tuple[Pair, ...] = tuple(p for p in ALL_PAIRS if p not in RARE_PAIRS + HELD_OUT_PAIRS)
RARE_WEIGHT = 1 / 20

FORM_WEIGHTS = {"one-group": 0.65, "two-groups": 0.25, "relation": 0.10}
COUNT_WEIGHTS = {1: 0.50, 2: 0.30, 3: 0.15, 4: 0.05}


def pair_weights() -> np.ndarray:
    """Sampling probability of each of ``ALL_PAIRS`` in pretraining captions, shape (24,)."""
    w = np.array(
        [0.0 if p in HELD_OUT_PAIRS else RARE_WEIGHT if p in RARE_PAIRS else 1.0 for p in ALL_PAIRS]
    )
    return w / w.sum()


def _counts(rng: np.random.Generator, max_count: int) -> int:
    keys = [k for k in COUNT_WEIGHTS if k <= max_count]
    p = np.array([COUNT_WEIGHTS[k] for k in keys])
    return int(rng.choice(keys, p=p / p.sum()))


def _distinct_pairs(rng: np.random.Generator, n: int, weights: np.ndarray) -> list[Pair]:
    idx = rng.choice(len(ALL_PAIRS), size=n, replace=False, p=weights)
    return [ALL_PAIRS[i] for i in idx]


def sample_caption(rng: np.random.Generator, biased: bool = True) -> ParsedPrompt:
    """One caption from the pretraining distribution (``biased=False``: all 24 pairs uniform,
    for the generic components, text encoder and VAE, which like CLIP and SD's VAE see broad data)."""
    weights = pair_weights() if biased else np.full(len(ALL_PAIRS), 1 / len(ALL_PAIRS))
    forms = list(FORM_WEIGHTS)
    form = forms[int(rng.choice(len(forms), p=list(FORM_WEIGHTS.values())))]
    if form == "one-group":
        (pair,) = _distinct_pairs(rng, 1, weights)
        return ParsedPrompt((Group(_counts(rng, 4), *pair),))
    a, b = _distinct_pairs(rng, 2, weights)
    if form == "two-groups":
        return ParsedPrompt((Group(_counts(rng, 3), *a), Group(_counts(rng, 3), *b)))
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    return ParsedPrompt((Group(1, *a), Group(1, *b)), relation)


def sample_training_example(
    rng: np.random.Generator, biased: bool = True
) -> tuple[np.ndarray, str, Scene]:
    """A random pretraining example: (uint8 image (64, 64, 3), caption, scene)."""
    parsed = sample_caption(rng, biased)
    scene = scene_for_prompt(parsed, rng)
    return render_scene(scene), parsed.text(), scene


def _one_group(pairs: tuple[Pair, ...], counts: tuple[int, ...]) -> list[str]:
    return [Group(n, c, s).text() for (c, s) in pairs for n in counts]


def prompt_sets() -> dict[str, list[str]]:
    """Named prompt sets used by training, evaluation and the CLI (``--prompt-set NAME``).

    - ``common``: common pairs, one group, counts 1-2 (what the base model should draw well);
    - ``rare``: rare pairs, counts 1-2; ``count4``: four of a common pair;
    - ``heldout``: held-out pairs, counts 1-2 (never seen in pretraining);
    - ``hard``: the fine-tuning targets the experiments use (rare colour binding, counting to four,
      a two-group composition); ``seen`` / ``unseen``: a multi-prompt split whose unseen half is
      never fine-tuned on.
    """
    common = _one_group(COMMON_PAIRS, (1, 2))
    sets = {
        "common": common,
        "rare": _one_group(RARE_PAIRS, (1, 2)),
        "count4": _one_group(COMMON_PAIRS, (4,)),
        "heldout": _one_group(HELD_OUT_PAIRS, (1, 2)),
        "hard": [
            "two white triangles",
            "four red squares",
            "two yellow squares and a white triangle",
        ],
        "seen": [
            "a green triangle",
            "two purple circles",
            "a yellow square",
            "four blue circles",
            "four white squares",
            "a white triangle and a red circle",
        ],
        "unseen": [
            "two green triangles",
            "a purple circle",
            "two yellow squares",
            "four orange circles",
            "four green squares",
            "a white triangle and a blue square",
        ],
    }
    for prompts in sets.values():
        for p in prompts:
            parse_prompt(p)  # every shipped set must be valid
    return sets


def pair_category(pair: Pair) -> str:
    """``common``, ``rare`` or ``heldout``."""
    if pair in HELD_OUT_PAIRS:
        return "heldout"
    return "rare" if pair in RARE_PAIRS else "common"


def sample_labelled_scene(rng: np.random.Generator, max_objects: int = 8) -> Scene:
    """A scene outside the grammar's constraints, for training the alignment reward model.

    0-3 groups of distinct uniform (color, shape) types, 1-6 objects each, at most
    ``max_objects`` in all (the reward must also see crowded and empty images, and five or six
    of a type, so that it can tell "four" from "more than four").
    """
    n_groups = int(rng.choice(4, p=[0.05, 0.45, 0.35, 0.15]))
    types = rng.choice(len(ALL_PAIRS), size=n_groups, replace=False)
    pairs: list[Pair] = []
    for k in types:
        pairs += [ALL_PAIRS[k]] * int(rng.choice([1, 2, 3, 4, 5, 6], p=[0.35, 0.25, 0.15, 0.12, 0.08, 0.05]))
    pairs = pairs[:max_objects]
    while True:
        scene = place_objects(pairs, rng)
        if scene is not None:
            return scene
        pairs = pairs[:-1]


def misaligned_variant(parsed: ParsedPrompt, rng: np.random.Generator) -> ParsedPrompt:
    """A prompt that differs from ``parsed`` in one way (count, color, shape, relation or a group),
    and so is false of any image aligned with ``parsed``."""
    from collections import Counter

    for _ in range(100):
        groups = list(parsed.groups)
        i = int(rng.integers(len(groups)))
        g = groups[i]
        kind = rng.choice(["count", "color", "shape", "swap" if parsed.relation else "count"])
        if kind == "count":
            limit = 4 if len(groups) == 1 else 3
            options = [n for n in range(1, limit + 1) if n != g.count]
            if parsed.relation is not None:
                continue
            groups[i] = Group(int(rng.choice(options)), g.color, g.shape)
        elif kind == "color":
            colors = [c for c in COLORS if c != g.color]
            groups[i] = Group(g.count, str(rng.choice(colors)), g.shape)
        elif kind == "shape":
            shapes = [s for s in SHAPES if s != g.shape]
            groups[i] = Group(g.count, g.color, str(rng.choice(shapes)))
        else:
            groups = groups[::-1]
        if len({x.pair for x in groups}) != len(groups):
            continue
        candidate = ParsedPrompt(tuple(groups), parsed.relation)
        same_objects = Counter(candidate.objects) == Counter(parsed.objects)
        if same_objects and parsed.relation is None:
            continue
        return candidate
    raise RuntimeError(f"no misaligned variant found for {parsed.text()!r}")
