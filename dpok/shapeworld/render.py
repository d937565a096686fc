"""Render ShapeWorld scenes to 64x64 RGB images.

Images are uint8 arrays of shape (64, 64, 3) on a black background. Shapes are flat-filled,
anti-aliased (4x4 supersampling), axis-aligned, with bounding boxes at least ``GAP`` px apart and
``BORDER`` px from the image edge. Everything is deterministic given a ``numpy.random.Generator``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .grammar import COLORS, Group, Pair, ParsedPrompt, parse_prompt

IMAGE_SIZE = 64
MIN_SIZE, MAX_SIZE = 10, 18
GAP = 2
BORDER = 1
SUPERSAMPLE = 4
_MAX_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class Shape:
    """One object: type and bounding box (x0, y0) top-left corner, side ``size``, in pixels."""

    color: str
    shape: str
    x0: int
    y0: int
    size: int

    @property
    def pair(self) -> Pair:
        return (self.color, self.shape)

    @property
    def centroid(self) -> tuple[float, float]:
        """Area centroid (x, y); y grows downwards. A triangle's is 2/3 of the way to its base."""
        cx = self.x0 + self.size / 2
        cy = self.y0 + (2 * self.size / 3 if self.shape == "triangle" else self.size / 2)
        return cx, cy


Scene = tuple[Shape, ...]


def _boxes_clear(a: Shape, x0: int, y0: int, size: int) -> bool:
    return (
        x0 >= a.x0 + a.size + GAP
        or a.x0 >= x0 + size + GAP
        or y0 >= a.y0 + a.size + GAP
        or a.y0 >= y0 + size + GAP
    )


def relation_holds(a: Shape, b: Shape, relation: str) -> bool:
    """``a <relation> b``: centroid strictly left of / above the other's."""
    (ax, ay), (bx, by) = a.centroid, b.centroid
    if relation == "left of":
        return ax < bx
    if relation == "above":
        return ay < by
    raise ValueError(f"unknown relation {relation!r}")


def place_objects(pairs: list[Pair], rng: np.random.Generator) -> Scene | None:
    """Random sizes and non-overlapping positions for ``pairs`` (in order), or None if they don't fit."""
    shapes: list[Shape] = []
    for color, shape in pairs:
        for _ in range(_MAX_PLACEMENT_TRIES):
            size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
            hi = IMAGE_SIZE - BORDER - size
            x0, y0 = int(rng.integers(BORDER, hi + 1)), int(rng.integers(BORDER, hi + 1))
            if all(_boxes_clear(s, x0, y0, size) for s in shapes):
                shapes.append(Shape(color, shape, x0, y0, size))
                break
        else:
            return None
    return tuple(shapes)


def scene_for_prompt(prompt: str | ParsedPrompt, rng: np.random.Generator) -> Scene:
    """A random scene that is aligned with ``prompt`` (objects in random order)."""
    parsed = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    pairs = [g.pair for g in parsed.groups for _ in range(g.count)]
    for _ in range(1000):
        scene = place_objects(pairs, rng)
        if scene is None:
            continue
        if parsed.relation is not None and not relation_holds(scene[0], scene[1], parsed.relation):
            continue
        order = rng.permutation(len(scene))
        return tuple(scene[i] for i in order)
    raise RuntimeError(f"could not place the objects of {parsed.text()!r}")


def _coverage(shape: str, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape in its size x size box, shape (size, size)."""
    n = size * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / SUPERSAMPLE  # sub-pixel centres in box pixels
    x, y = np.meshgrid(c, c)
    if shape == "square":
        inside = np.ones((n, n), dtype=bool)
    elif shape == "circle":
        r = size / 2
        inside = (x - r) ** 2 + (y - r) ** 2 <= r * r
    elif shape == "triangle":
        # apex at (size/2, 0), base along y = size: |x - size/2| <= y / 2
        inside = np.abs(x - size / 2) <= y / 2
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render_scene(scene: Scene) -> np.ndarray:
    """Draw a scene. Returns uint8 (64, 64, 3)."""
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    for s in scene:
        alpha = _coverage(s.shape, s.size)[..., None]
        rgb = np.asarray(COLORS[s.color], dtype=np.float32)
        box = image[s.y0 : s.y0 + s.size, s.x0 : s.x0 + s.size]
        box[:] = box * (1 - alpha) + rgb * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_prompt(prompt: str | ParsedPrompt, rng: np.random.Generator) -> tuple[np.ndarray, Scene]:
    """Render a random image aligned with ``prompt``. Returns (uint8 (64, 64, 3), scene)."""
    scene = scene_for_prompt(prompt, rng)
    return render_scene(scene), scene


def scene_matches(scene: Scene, parsed: ParsedPrompt) -> bool:
    """Ground truth alignment of a scene with a parsed prompt (objects and relation)."""
    from collections import Counter

    if Counter(s.pair for s in scene) != parsed.objects:
        return False
    if parsed.relation is None:
        return True
    a = next(s for s in scene if s.pair == parsed.groups[0].pair)
    b = next(s for s in scene if s.pair == parsed.groups[1].pair)
    return relation_holds(a, b, parsed.relation)


def groups_of(scene: Scene) -> tuple[Group, ...]:
    """Group a scene's objects by type, in first-appearance order."""
    from collections import Counter

    counts = Counter(s.pair for s in scene)
    return tuple(Group(n, c, s) for (c, s), n in counts.items())
