"""Domains: what a model's world brings besides images and text.

A domain supplies the default training prompts, named prompt sets, a prompt checker (a grammar)
and extra evaluation measures (e.g. an independent judge). The library reads a model's domain
from its folder and never names one: a model folder holding ``dpok_domain.json``
(``{"module": "package.module"}``) belongs to the domain that module defines as ``DOMAIN``; a
registered reward may name a domain module too (its prompts are then checked by that domain's
grammar whatever the model). A model without one has no domain: any text is a prompt and the
evaluation measures are the domain-free ones.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter import ModelLoadError, resolve_model
from .rewards.registry import reward_domain_modules

DOMAIN_FILE = "dpok_domain.json"


@dataclass(frozen=True)
class Domain:
    """What a domain supplies.

    - ``default_prompts``: training prompts when none are given;
    - ``eval_sets``: names of the (seen, unseen) prompt sets ``dpok eval`` uses when none are given;
    - ``prompt_sets()``: name -> prompts;
    - ``check_prompt(prompt)``: raises a ``ValueError`` naming a prompt outside the domain's grammar;
    - ``measures(images, prompt, seed)``: extra per-prompt measures of images (N, 3, H, W) in [0, 1],
      e.g. ``{"judge_aligned": ..., "clean_share": ..., "frechet": ...}``.
    """

    name: str
    default_prompts: tuple[str, ...]
    eval_sets: tuple[str, str]
    prompt_sets: Callable[[], dict[str, list[str]]]
    check_prompt: Callable[[str], object]
    measures: Callable[[torch.Tensor, str, int], dict[str, float]]
    prompt_error: type[ValueError] = ValueError


def load_domain(module: str) -> Domain:
    """The ``DOMAIN`` of an importable module (``package.module``)."""
    try:
        domain = importlib.import_module(module).DOMAIN
    except (ImportError, AttributeError) as e:
        raise ValueError(f"domain module {module!r} cannot be loaded ({e}); it must define DOMAIN") from e
    if not isinstance(domain, Domain):
        raise ValueError(f"{module}.DOMAIN is a {type(domain).__name__}, not a dpok Domain")
    return domain


def folder_domain(folder: str | Path) -> Domain | None:
    """The domain a model folder names in ``dpok_domain.json`` (None: no file, no domain)."""
    path = Path(folder) / DOMAIN_FILE
    if not path.is_file():
        return None
    try:
        module = json.loads(path.read_text(encoding="utf-8"))["module"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a domain file ({e}); it holds {{\"module\": \"package.module\"}}") from e
    return load_domain(module)


def write_domain_file(folder: str | Path, module: str) -> Path:
    """Mark a model folder as belonging to the domain of ``module``."""
    path = Path(folder) / DOMAIN_FILE
    path.write_text(json.dumps({"module": module}) + "\n", encoding="utf-8")
    return path


def model_domain(model: str) -> Domain | None:
    """The domain of a model (a folder, or a name the adapter resolves to one); None for a hub id or
    a folder without a domain file."""

    try:
        resolved = resolve_model(model)
    except ModelLoadError:
        return None  # the adapter reports a missing model when it loads it
    return folder_domain(resolved) if Path(resolved).is_dir() else None


def reward_domain(spec: str) -> Domain | None:
    """The domain named by a registered reward of ``spec`` (the first that names one), else None."""

    modules = reward_domain_modules(spec)
    return load_domain(modules[0]) if modules else None


def domain_for(model: str, reward: str = "") -> Domain | None:
    """The model's domain, else the reward's (a domain reward checks prompts on any model)."""
    return model_domain(model) or (reward_domain(reward) if reward else None)
