"""An exact geometric judge of ShapeWorld images, independent of every learned model.

It segments the non-black pixels into connected components and classifies each component by its
colour (nearest palette entry) and its fill ratio inside its bounding box (square ~1, circle
~pi/4, triangle ~1/2). It works on generated images too: a component whose colour is far from
every palette entry, whose box is not square-ish, or whose fill matches no shape is ``unknown``,
which makes the image both misaligned and not clean.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .grammar import COLORS, Pair, ParsedPrompt, parse_prompt
from .render import MAX_SIZE, MIN_SIZE

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)
FOREGROUND_THRESHOLD = 100.0  # max channel (0-255) for a pixel to count as an object pixel
SPECK_PIXELS = 6  # components smaller than this are specks: ignored for alignment, not clean
MAX_COLOR_DISTANCE = 60.0  # RGB distance from the component's colour to its palette entry
FILL_RANGES = {"triangle": (0.36, 0.64), "circle": (0.68, 0.88), "square": (0.9, 1.01)}


@dataclass(frozen=True)
class DetectedObject:
    """One component: its type (``None`` colour/shape when unrecognised) and geometry."""

    color: str | None
    shape: str | None
    centroid: tuple[float, float]  # (x, y), y downwards
    box: tuple[int, int, int, int]  # x0, y0, width, height
    fill: float
    color_distance: float

    @property
    def pair(self) -> Pair | None:
        if self.color is None or self.shape is None:
            return None
        return (self.color, self.shape)


@dataclass(frozen=True)
class Judgement:
    """What the judge saw in one image."""

    objects: tuple[DetectedObject, ...]
    specks: int

    @property
    def clean(self) -> bool:
        """Every component is a recognisable shape and there are no specks."""
        return self.specks == 0 and all(o.pair is not None for o in self.objects)

    @property
    def counts(self) -> Counter[Pair | None]:
        return Counter(o.pair for o in self.objects)


def _to_uint8_hwc(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(np.rint(a.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3) or (3, H, W), got shape {a.shape}")
    return a


def _shape_of(fill: float, width: int, height: int) -> str | None:
    if not (MIN_SIZE - 3 <= width <= MAX_SIZE + 3 and MIN_SIZE - 3 <= height <= MAX_SIZE + 3):
        return None
    if not 0.75 <= width / height <= 1.33:
        return None
    for shape, (lo, hi) in FILL_RANGES.items():
        if lo <= fill <= hi:
            return shape
    return None


def judge(image: np.ndarray) -> Judgement:
    """Segment and classify. ``image``: uint8 (H, W, 3) or float in [0, 1], HWC or CHW."""
    rgb = _to_uint8_hwc(image).astype(np.float32)
    mask = rgb.max(axis=-1) > FOREGROUND_THRESHOLD
    labels, n = ndimage.label(mask)
    objects: list[DetectedObject] = []
    specks = 0
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == i
        area = int(comp.sum())
        if area < SPECK_PIXELS:
            specks += 1
            continue
        height, width = comp.shape
        pixels = rgb[sl][comp]
        # the brightest half of the pixels: the flat interior, not the anti-aliased rim
        bright = pixels[pixels.max(axis=1) >= np.median(pixels.max(axis=1))]
        mean_rgb = bright.mean(axis=0)
        dist = np.linalg.norm(_PALETTE - mean_rgb, axis=1)
        k = int(dist.argmin())
        ys, xs = np.nonzero(comp)
        fill = area / float(width * height)
        objects.append(
            DetectedObject(
                color=_PALETTE_NAMES[k] if dist[k] <= MAX_COLOR_DISTANCE else None,
                shape=_shape_of(fill, width, height),
                centroid=(float(xs.mean() + sl[1].start + 0.5), float(ys.mean() + sl[0].start + 0.5)),
                box=(sl[1].start, sl[0].start, width, height),
                fill=fill,
                color_distance=float(dist[k]),
            )
        )
    return Judgement(tuple(objects), specks)


FLAWS = ("missing", "extra", "foreign", "unrecognised", "relation")
"""Why an image is not aligned, as :func:`flaws` names it (an image may have several)."""


def flaws(image: np.ndarray | Judgement, prompt: str | ParsedPrompt) -> frozenset[str]:
    """What keeps an image from its prompt; empty exactly when :func:`is_aligned`.

    - ``missing``: some type of the prompt drawn fewer times than asked (``two`` drawn once);
    - ``extra``: some type of the prompt drawn more times than asked (``two`` drawn three times);
    - ``foreign``: a recognised (colour, shape) the prompt does not name (a wrong colour or shape,
      or a stray object);
    - ``unrecognised``: a component of no palette colour or no shape (a blob, a merged pair);
    - ``relation``: the objects are right but the relation does not hold.

    ``image`` may be an image (as :func:`judge` takes) or its :class:`Judgement`.
    """
    parsed = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    j = image if isinstance(image, Judgement) else judge(image)
    want, got = Counter(parsed.objects), j.counts
    found = set()
    if any(got[pair] < n for pair, n in want.items()):
        found.add("missing")
    if any(got[pair] > n for pair, n in want.items()):
        found.add("extra")
    if any(pair is not None and pair not in want for pair in got):
        found.add("foreign")
    if None in got:
        found.add("unrecognised")
    if not found and parsed.relation is not None and not _relation_holds(j, parsed):
        found.add("relation")
    return frozenset(found)


def _relation_holds(j: Judgement, parsed: ParsedPrompt) -> bool:
    a = next(o for o in j.objects if o.pair == parsed.groups[0].pair)
    b = next(o for o in j.objects if o.pair == parsed.groups[1].pair)
    if parsed.relation == "left of":
        return a.centroid[0] < b.centroid[0]
    return a.centroid[1] < b.centroid[1]


def is_aligned(image: np.ndarray, prompt: str | ParsedPrompt) -> bool:
    """Objects equal the prompt's multiset exactly and, for relations, the relation holds."""
    return not flaws(image, prompt)
