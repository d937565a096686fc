"""The built-in rewards.

- ``shapeworld-alignment``: the learned ShapeWorld alignment model's probability in [0, 1] that
  the prompt is exactly true of the image (see :mod:`dpok.embedded.alignment`).
- ``shapeworld-alignment-log``: log r of the same model with each term (one object type's count,
  the relation) floored at log 1e-3: a dense form with partial credit, for prompts whose exact r is
  ~0 on every sample the model draws (two-group compositions), where r gives no signal.
- ``shapeworld-judge``: 1 if the geometric judge finds the prompt exactly true of the image, else 0.
  An oracle for diagnosis (is the learned reward what limits a run, or the optimisation?): with it the
  judge no longer scores a run independently of its reward.
- ``jpeg-compressibility`` / ``jpeg-incompressibility``: minus / plus the size in kB
  (1 kB = 1000 bytes) of the image saved as JPEG at quality 95, as in DDPO.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..assets import default_reward_dir
from ..embedded.alignment import AlignmentRewardModel
from ..shapeworld.grammar import parse_prompt
from .base import Reward
from .registry import register_reward

JPEG_QUALITY = 95


class ShapeWorldAlignmentReward(Reward):
    """r(x, z) in [0, 1] from the alignment reward model in ``alignment_model`` (a folder).

    The model loads on first use (or :meth:`load`), so building the reward and validating prompts
    are cheap. Images of any size are resized to 64x64 by the model.
    """

    name = "shapeworld-alignment"

    def __init__(self, alignment_model: str | Path | None = None, device: str | torch.device = "cpu") -> None:
        self.folder = Path(alignment_model).expanduser() if alignment_model is not None else None
        self.device = torch.device(device)
        self._model: AlignmentRewardModel | None = None

    def model_dir(self) -> Path:
        """The weights folder: the one given, else the package's shipped one."""
        if self.folder is not None:
            return self.folder
        return default_reward_dir()

    def load(self) -> AlignmentRewardModel:
        """Load the model now; FileNotFoundError (saying how to make the weights) if the folder lacks them."""
        if self._model is None:
            self._model = AlignmentRewardModel.load(self.model_dir(), self.device)
        return self._model

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        """Raise :class:`~dpok.shapeworld.PromptError` (naming the prompt) for a prompt outside the grammar."""
        for prompt in prompts:
            parse_prompt(prompt)

    def to(self, device: str | torch.device) -> ShapeWorldAlignmentReward:
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    def _compute(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        parsed = [parse_prompt(p) for p in prompts]
        model = self.load()
        return model.score(images.to(self.device, torch.float32), parsed)

    def log_prob(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """log r, shape (B,), for images float (B, 3, H, W) in [0, 1] (no input checks)."""
        parsed = [parse_prompt(p) for p in prompts]
        return self.load().log_prob(images.to(self.device, torch.float32), parsed)


class ShapeWorldLogAlignmentReward(ShapeWorldAlignmentReward):
    """log r(x, z) with every term floored at ``TERM_FLOOR`` (see ``alignment_log_prob``), in
    [TERM_FLOOR x (24 types + a relation), 0]: 0 when the prompt is surely true, about ``TERM_FLOOR``
    per object type that is surely wrong, so getting one group of a composition right already pays."""

    name = "shapeworld-alignment-log"
    TERM_FLOOR = math.log(1e-3)

    def _compute(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        parsed = [parse_prompt(p) for p in prompts]
        return self.load().log_prob(images.to(self.device, torch.float32), parsed, self.TERM_FLOOR)


class ShapeWorldJudgeReward(Reward):
    """1.0 where :func:`dpok.shapeworld.judge.is_aligned` holds for (image, prompt), else 0.0; (B,)."""

    name = "shapeworld-judge"

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        """Raise :class:`~dpok.shapeworld.PromptError` (naming the prompt) for a prompt outside the grammar."""
        for prompt in prompts:
            parse_prompt(prompt)

    def _compute(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from ..shapeworld.judge import is_aligned

        arrays = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()  # HWC, as the judge reads
        return torch.tensor([float(is_aligned(a, p)) for a, p in zip(arrays, prompts)], dtype=torch.float32)


def jpeg_sizes_kb(images: torch.Tensor) -> torch.Tensor:
    """Size in kB (1000 bytes) of each image of float (B, 3, H, W) in [0, 1] saved as JPEG, quality 95; (B,)."""
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).numpy()  # HWC, as PIL reads it
    sizes = []
    for array in arrays:
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegSizeReward(Reward):
    """``sign`` times the JPEG size in kB: -1 rewards compressible images, +1 incompressible ones."""

    def __init__(self, sign: float, name: str) -> None:
        self.sign = float(sign)
        self.name = name

    def _compute(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.sign * jpeg_sizes_kb(images)


@register_reward(
    "shapeworld-alignment",
    "probability in [0, 1] that a ShapeWorld prompt is exactly true of the image (learned model; "
    "option alignment_model=FOLDER)",
    domain="dpok.shapeworld.domain",
)
def shapeworld_alignment(
    alignment_model: str | Path | None = None, device: str | torch.device = "cpu"
) -> ShapeWorldAlignmentReward:
    """The ``shapeworld-alignment`` reward; ``alignment_model`` defaults to the package's shipped weights."""
    return ShapeWorldAlignmentReward(alignment_model, device)


@register_reward(
    "shapeworld-alignment-log",
    "log of shapeworld-alignment with each object type's term floored at log 1e-3: partial credit for "
    "prompts (two-group compositions) where the exact probability is ~0 on every sample; option alignment_model",
    domain="dpok.shapeworld.domain",
)
def shapeworld_alignment_log(
    alignment_model: str | Path | None = None, device: str | torch.device = "cpu"
) -> ShapeWorldLogAlignmentReward:
    """The ``shapeworld-alignment-log`` reward; ``alignment_model`` defaults to the package's shipped weights."""
    return ShapeWorldLogAlignmentReward(alignment_model, device)


@register_reward(
    "shapeworld-judge",
    "1 if the geometric judge finds a ShapeWorld prompt exactly true of the image, else 0: an oracle for diagnosis "
    "(the judge then no longer scores the run independently)",
    domain="dpok.shapeworld.domain",
)
def shapeworld_judge() -> ShapeWorldJudgeReward:
    """The ``shapeworld-judge`` reward."""
    return ShapeWorldJudgeReward()


@register_reward("jpeg-compressibility", "minus the JPEG size (quality 95) in kB: rewards simple images (DDPO)")
def jpeg_compressibility() -> JpegSizeReward:
    """The ``jpeg-compressibility`` reward."""
    return JpegSizeReward(-1.0, "jpeg-compressibility")


@register_reward("jpeg-incompressibility", "the JPEG size (quality 95) in kB: rewards detailed images (DDPO)")
def jpeg_incompressibility() -> JpegSizeReward:
    """The ``jpeg-incompressibility`` reward."""
    return JpegSizeReward(1.0, "jpeg-incompressibility")
