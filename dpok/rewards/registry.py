"""Reward names, and building a reward from a spec string.

A spec (``--reward`` on the command line) is one of

- a registered name, e.g. ``shapeworld-alignment`` (see :func:`available_rewards`);
- a user function ``package.module:function`` (see :mod:`dpok.rewards.custom`);
- a weighted sum of those, terms joined by ``+``, each ``NAME`` or ``WEIGHT*NAME``:
  ``shapeworld-alignment+0.1*jpeg-compressibility``, ``2*a+-0.5*b``. Names contain ``-``, so a
  negative weight is written ``+-0.5*b`` (or ``-1*b``), never ``a-b``.

Options (``make_reward(spec, alignment_model=...)``) go only to the factories whose signature
accepts them (by name, or all of them for a factory with ``**kwargs``). An option whose value is
None means "use the default" and is dropped, so a caller may pass its settings unconditionally;
an option with a value that no part of the spec accepts is a :class:`RewardError`, because
silently ignoring e.g. a mistyped reward model path would train against the wrong reward.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .base import Reward, RewardError, WeightedSum
from .custom import load_custom_reward

RewardFactory = Callable[..., Reward]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A term cut inside a number's exponent, e.g. "1e" from "1e+3*name", to be joined with the next piece.
_CUT_EXPONENT_RE = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)[eE]$")


@dataclass(frozen=True)
class RewardEntry:
    """A registered reward: its name, a one-line description and the factory ``f(**options) -> Reward``."""

    name: str
    description: str
    factory: RewardFactory
    domain: str = ""  # module of the domain whose prompts it scores (see dpok.domains), if any


class RewardRegistry:
    """Name -> :class:`RewardEntry`. The package has one, :data:`REWARDS`."""

    def __init__(self) -> None:
        self._entries: dict[str, RewardEntry] = {}

    def register(self, name: str, description: str, factory: RewardFactory, domain: str = "") -> None:
        """Add a reward; a name already taken by another factory is an error."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise RewardError(
                f"invalid reward name {name!r}: use letters, digits, '-', '_' and '.' (no '+', '*', ':' or spaces, "
                "which the spec syntax uses)"
            )
        old = self._entries.get(name)
        # Re-registering the same function (a module imported twice) is harmless; a different one is a clash.
        if old is not None and getattr(old.factory, "__qualname__", None) != getattr(factory, "__qualname__", None):
            raise RewardError(f"reward name {name!r} is already registered ({old.description})")
        self._entries[name] = RewardEntry(name, description, factory, domain)

    def get(self, name: str) -> RewardEntry:
        """The entry of ``name``, or a :class:`RewardError` listing the valid names."""
        entry = self._entries.get(name)
        if entry is None:
            raise RewardError(
                f"unknown reward {name!r}; available rewards: {', '.join(sorted(self._entries))}; "
                "or give your own as 'package.module:function' (an importable function "
                "f(images, prompts) -> one score per image)"
            )
        return entry

    def descriptions(self) -> dict[str, str]:
        """name -> description, sorted by name."""
        return {n: self._entries[n].description for n in sorted(self._entries)}

    def __contains__(self, name: object) -> bool:
        return name in self._entries


REWARDS = RewardRegistry()


def register_reward(name: str, description: str, domain: str = "") -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering ``factory(**options) -> Reward`` under ``name``; returns the factory unchanged.

    ``domain``: the module of the domain whose prompts the reward scores (see :mod:`dpok.domains`)."""

    def decorate(factory: RewardFactory) -> RewardFactory:
        REWARDS.register(name, description, factory, domain)
        return factory

    return decorate


def reward_domain_modules(spec: str) -> list[str]:
    """The domain modules the registered rewards of ``spec`` name (a bad spec names none)."""
    try:
        terms = parse_reward_spec(spec)
    except RewardError:
        return []
    entries = [REWARDS._entries.get(name) for _, name in terms]
    return [e.domain for e in entries if e is not None and e.domain]


def available_rewards() -> dict[str, str]:
    """Registered reward names -> one-line descriptions."""
    return REWARDS.descriptions()


def parse_reward_spec(spec: str) -> list[tuple[float, str]]:
    """Split a spec into (weight, name) terms; a plain name gives ``[(1.0, name)]``.

    Raises :class:`RewardError` quoting the spec for an empty term or a bad weight.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardError(f"empty reward spec {spec!r}; give a reward name, e.g. 'shapeworld-alignment'")
    pieces = spec.split("+")
    terms: list[str] = []
    i = 0
    while i < len(pieces):
        piece = pieces[i]
        while _CUT_EXPONENT_RE.match(piece) and i + 1 < len(pieces):
            i += 1
            piece = piece + "+" + pieces[i]
        terms.append(piece)
        i += 1
    return [_parse_term(term.strip(), spec) for term in terms]


def _parse_term(term: str, spec: str) -> tuple[float, str]:
    example = "e.g. 'shapeworld-alignment+0.1*jpeg-compressibility'"
    if not term:
        raise RewardError(f"empty term in reward spec {spec!r}; join terms with '+', {example}")
    if "*" not in term:
        if term.startswith("-"):
            raise RewardError(f"bad term {term!r} in reward spec {spec!r}: write a negative term as '-1*NAME'")
        return 1.0, term
    weight_text, name = (s.strip() for s in term.split("*", 1))
    try:
        weight = float(weight_text)
    except ValueError:
        raise RewardError(
            f"bad weight {weight_text!r} in reward spec {spec!r}: a term is NAME or NUMBER*NAME, {example}"
        ) from None
    if not math.isfinite(weight):
        raise RewardError(f"bad weight {weight_text!r} in reward spec {spec!r}: weights must be finite numbers")
    if not name or "*" in name:
        raise RewardError(f"bad term {term!r} in reward spec {spec!r}: a term is NAME or NUMBER*NAME, {example}")
    return weight, name


def make_reward(spec: str, device: str | torch.device = "cpu", **options: Any) -> Reward:
    """Build the reward of ``spec`` (see the module docstring) on ``device``.

    ``options`` (e.g. ``alignment_model="path/to/folder"``) go to the factories that accept them;
    None values are dropped; any other option no part accepts raises :class:`RewardError`.
    """
    terms = parse_reward_spec(spec)
    spec = spec.strip()
    options = {k: v for k, v in options.items() if v is not None}
    # Resolve every name before building anything, so a typo fails before a model loads.
    plans = [(weight, name, _factory_of(name)) for weight, name in terms]
    accepted: set[str] = set()
    for _, _, factory in plans:
        accepted |= _accepted_options(factory, options)
    unused = sorted(set(options) - accepted)
    if unused:
        raise RewardError(
            f"option(s) {', '.join(unused)} not accepted by reward {spec!r}; options are passed only to rewards "
            "whose factory takes them"
        )
    built = [(weight, _build(name, factory, device, options)) for weight, name, factory in plans]
    is_sum = len(terms) > 1 or "*" in spec
    return WeightedSum(built, name=spec) if is_sum else built[0][1]


def _factory_of(name: str) -> RewardFactory | None:
    """The registered factory of ``name``; None for a custom ``module:function`` (built by the custom loader)."""
    if ":" in name:
        return None
    return REWARDS.get(name).factory


def _accepted_options(factory: RewardFactory | None, options: dict[str, Any]) -> set[str]:
    if factory is None:
        return set()
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(options)
    return {k for k in options if k in params and k != "device"}


def _build(name: str, factory: RewardFactory | None, device: str | torch.device, options: dict[str, Any]) -> Reward:
    if factory is None:
        return load_custom_reward(name).to(device)
    kwargs = {k: options[k] for k in _accepted_options(factory, options)}
    takes_device = "device" in inspect.signature(factory).parameters
    if takes_device:
        kwargs["device"] = device
    reward = factory(**kwargs)
    if not isinstance(reward, Reward):
        raise RewardError(f"the factory of reward {name!r} returned {type(reward).__name__}, not a Reward")
    reward.name = name  # errors and logs name the reward as the user wrote it
    return reward if takes_device else reward.to(device)
