"""The ShapeWorld prompt grammar: vocabulary, parsing and formatting.

Three prompt forms, lower-case, no trailing period:

1. one group:   ``<count> <color> <shape>[s]``               e.g. ``three blue squares``
2. two groups:  ``<group> and <group>`` (1-3 objects each,   e.g. ``two red circles and a blue square``
   different (color, shape) pairs)
3. relation:    ``a <color> <shape> (left of|above) a <color> <shape>`` (different pairs)

``parse_prompt`` returns a :class:`ParsedPrompt` (object multiset and relation) or raises
:class:`PromptError` naming the prompt, the offending word and what the grammar expects.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 220, 50),
    "green": (40, 190, 70),
    "cyan": (40, 200, 220),
    "blue": (50, 80, 230),
    "purple": (150, 60, 210),
    "white": (240, 240, 240),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three", 4: "four"}
WORD_COUNTS: dict[str, int] = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
RELATIONS: tuple[str, ...] = ("left of", "above")
MAX_COUNT_ONE_GROUP = 4
MAX_COUNT_TWO_GROUPS = 3

Pair = tuple[str, str]
"""A (color, shape) object type."""

ALL_PAIRS: tuple[Pair, ...] = tuple((c, s) for c in COLORS for s in SHAPES)


class PromptError(ValueError):
    """A prompt outside the ShapeWorld grammar."""


@dataclass(frozen=True)
class Group:
    """``count`` objects of one (color, shape) type."""

    count: int
    color: str
    shape: str

    @property
    def pair(self) -> Pair:
        return (self.color, self.shape)

    def text(self) -> str:
        article = COUNT_WORDS[self.count]
        if self.count == 1 and self.color[0] in "aeiou":
            article = "an"
        noun = self.shape + ("s" if self.count > 1 else "")
        return f"{article} {self.color} {noun}"


@dataclass(frozen=True)
class ParsedPrompt:
    """The meaning of a prompt: its groups and, for the relation form, the relation.

    For a relation prompt ``groups == (subject, object)`` each with count 1 and
    ``relation in RELATIONS``; otherwise ``relation is None``.
    """

    groups: tuple[Group, ...]
    relation: str | None = None

    @property
    def form(self) -> str:
        if self.relation is not None:
            return "relation"
        return "one-group" if len(self.groups) == 1 else "two-groups"

    @property
    def objects(self) -> Counter[Pair]:
        """The multiset of (color, shape) objects an aligned image shows."""
        counts: Counter[Pair] = Counter()
        for g in self.groups:
            counts[g.pair] += g.count
        return counts

    @property
    def num_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def text(self) -> str:
        if self.relation is not None:
            return f"{self.groups[0].text()} {self.relation} {self.groups[1].text()}"
        return " and ".join(g.text() for g in self.groups)


def _fail(prompt: str, why: str) -> PromptError:
    return PromptError(
        f"prompt {prompt!r} is outside the ShapeWorld grammar: {why}. Valid forms: "
        "'<count> <color> <shape>[s]' (e.g. 'two blue squares'), '<group> and <group>' "
        "(e.g. 'two red circles and a blue square'), or 'a <color> <shape> left of|above a "
        f"<color> <shape>'. Counts: a/an, two, three, four; colors: {', '.join(COLORS)}; "
        f"shapes: {', '.join(SHAPES)}."
    )


def _parse_group(prompt: str, words: list[str]) -> Group:
    if len(words) != 3:
        raise _fail(prompt, f"expected '<count> <color> <shape>', got {' '.join(words)!r}")
    count_word, color, noun = words
    if count_word not in WORD_COUNTS:
        raise _fail(prompt, f"unknown count word {count_word!r}")
    count = WORD_COUNTS[count_word]
    if color not in COLORS:
        raise _fail(prompt, f"unknown color {color!r}")
    if count == 1:
        expected_article = "an" if color[0] in "aeiou" else "a"
        if count_word != expected_article:
            raise _fail(prompt, f"use {expected_article!r} before {color!r}")
        shape = noun
    else:
        if not noun.endswith("s"):
            raise _fail(prompt, f"count {count_word!r} needs the plural {noun + 's'!r}")
        shape = noun[:-1]
    if shape not in SHAPES:
        raise _fail(prompt, f"unknown shape {noun!r}")
    return Group(count, color, shape)


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Parse a ShapeWorld prompt, or raise :class:`PromptError` saying what is wrong."""
    if not isinstance(prompt, str):
        raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
    if prompt != prompt.strip() or "  " in prompt:
        raise _fail(prompt, "stray whitespace")
    if prompt != prompt.lower():
        raise _fail(prompt, "prompts are lower-case")
    if prompt.endswith("."):
        raise _fail(prompt, "no trailing period")
    words = prompt.split(" ")
    for relation in RELATIONS:
        rel_words = relation.split(" ")
        n = len(rel_words)
        for i in range(len(words) - n + 1):
            if words[i : i + n] == rel_words:
                left = _parse_group(prompt, words[:i])
                right = _parse_group(prompt, words[i + n :])
                if left.count != 1 or right.count != 1:
                    raise _fail(prompt, "a relation takes one object on each side")
                if left.pair == right.pair:
                    raise _fail(prompt, "a relation needs two different (color, shape) objects")
                return ParsedPrompt((left, right), relation)
    if "and" in words:
        i = words.index("and")
        first = _parse_group(prompt, words[:i])
        second = _parse_group(prompt, words[i + 1 :])
        for g in (first, second):
            if g.count > MAX_COUNT_TWO_GROUPS:
                raise _fail(prompt, f"each group of a two-group prompt has 1 to {MAX_COUNT_TWO_GROUPS} objects")
        if first.pair == second.pair:
            raise _fail(prompt, "the two groups must be different (color, shape) pairs")
        return ParsedPrompt((first, second))
    return ParsedPrompt((_parse_group(prompt, words),))


def format_prompt(groups: tuple[Group, ...], relation: str | None = None) -> str:
    """Inverse of :func:`parse_prompt`; validates by parsing the result."""
    text = ParsedPrompt(tuple(groups), relation).text()
    parse_prompt(text)
    return text


def vocabulary() -> list[str]:
    """Every word the grammar uses (for the tokenizer)."""
    words = set(WORD_COUNTS) | set(COLORS) | set(SHAPES) | {s + "s" for s in SHAPES}
    words |= {"and", "left", "of", "above"}
    return sorted(words)
