"""User rewards given as ``package.module:function``.

The function is called as ``function(images, prompts)`` (or, if it takes a third argument,
``function(images, prompts, metadata)`` with one dict of prompt metadata per image) with ``images`` a float tensor
(B, 3, H, W) in [0, 1] (on the trainer's device) and ``prompts`` a list of B strings, under
``torch.no_grad``; it returns one score per image: a list of numbers, a numpy array or a tensor,
of shape (B,) or (B, 1). NaN / inf scores mark a sample invalid (masked by the trainer).

The module must be importable: installed, or its folder on ``PYTHONPATH`` (the ``dpok`` command
does not search the current directory; run e.g. ``PYTHONPATH=. dpok train --reward myrewards:score``).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

import torch

from .base import Reward, RewardError, ScoreLike

_SPEC_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def takes_metadata(function: Callable[..., Any]) -> bool:
    """Whether ``function`` can be called with three positional arguments (images, prompts, metadata)."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: called with two
        return False
    try:
        signature.bind(None, None, None)
    except TypeError:
        return False
    return True


class CustomReward(Reward):
    """Wraps a user function ``f(images, prompts) -> scores`` (or ``f(images, prompts, metadata)``,
    which is then handed the prompts' metadata); its name is the spec. Its cost is unknown here (it
    may call a service or another device), so ``--reward-overlap auto`` scores it beside the sampling."""

    overlaps_sampling = True

    def __init__(self, spec: str, function: Callable[..., ScoreLike]) -> None:
        if not callable(function):
            raise RewardError(f"reward {spec!r} is a {type(function).__name__}, not a function "
                              "f(images, prompts[, metadata]) -> one score per image")
        self.name = spec
        self.function = function
        self.uses_metadata = takes_metadata(function)

    def _compute(self, images: torch.Tensor, prompts: list[str], *metadata: list[dict[str, Any]]) -> ScoreLike:
        return self.function(images, prompts, *metadata)


def load_custom_reward(spec: str) -> Reward:
    """Import ``package.module:function`` and wrap the function as a :class:`Reward` named ``spec``.

    Raises :class:`RewardError` when the spec is malformed, the module cannot be imported, the
    attribute is missing or is not callable.
    """
    spec = spec.strip()
    if not _SPEC_RE.match(spec):
        raise RewardError(
            f"bad custom reward {spec!r}: expected 'package.module:function', e.g. 'myrewards:aesthetic_score'"
        )
    module_name, attr_path = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise RewardError(
                f"cannot import module {module_name!r} of custom reward {spec!r}: no module named {missing!r}. "
                "The module must be importable: install its package, or put the folder that holds it on "
                "PYTHONPATH (e.g. 'PYTHONPATH=. dpok train ...'; the current directory is not searched otherwise)"
            ) from e
        # The module exists but itself imports something that is not installed.
        raise RewardError(
            f"importing module {module_name!r} of custom reward {spec!r} failed: it needs {missing!r}, "
            f"which is not installed ({e})"
        ) from e
    except Exception as e:  # any error raised while the user's module runs its top level
        raise RewardError(
            f"importing module {module_name!r} of custom reward {spec!r} raised {type(e).__name__}: {e}"
        ) from e
    target: object = module
    for part in attr_path.split("."):
        if not hasattr(target, part):
            raise RewardError(f"module {module_name!r} has no attribute {attr_path!r} (custom reward {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise RewardError(
            f"{spec!r} is a {type(target).__name__}, not a function; a custom reward is a function "
            "f(images, prompts) -> one score per image"
        )
    return CustomReward(spec, target)
