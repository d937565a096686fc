"""Where the files shipped inside the package live: the embedded model, its reward, the presets.

A module of its own so that the adapter and the rewards find the embedded model's folders without
importing the pretraining code that makes them.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_MODELS = {"shapeworld": "the embedded ShapeWorld model (DDIM, UNet)",
                   "shapeworld-flow": "the embedded flow-matching ShapeWorld model (SD3 transformer)"}


def package_dir() -> Path:
    """The installed ``dpok`` package folder."""
    return Path(__file__).resolve().parent


def default_model_dir() -> Path:
    """The embedded ShapeWorld pipeline (``dpok/assets/shapeworld``), what ``--model shapeworld`` loads."""
    return package_dir() / "assets" / "shapeworld"


def default_flow_model_dir() -> Path:
    """The embedded flow-matching ShapeWorld pipeline (``dpok/assets/shapeworld-flow``, an SD3
    folder), what ``--model shapeworld-flow`` loads."""
    return package_dir() / "assets" / "shapeworld-flow"


def default_reward_dir() -> Path:
    """The embedded model's alignment reward (``dpok/assets/shapeworld-alignment``)."""
    return package_dir() / "assets" / "shapeworld-alignment"


def preset_dir() -> Path:
    """The shipped preset config files (``dpok/presets/NAME.yaml``)."""
    return package_dir() / "presets"
