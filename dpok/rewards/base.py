"""The reward interface: a callable from (images, prompts) to one score per image.

Every reward sees images as a float tensor (B, 3, H, W) with values in [0, 1] and prompts as a
list of B strings, and returns a :class:`RewardOutput`. A reward with ``uses_metadata = True`` is
also handed each prompt's metadata (a dict per image: the other fields of a JSON Lines prompt
file's line, or what a prompt function returned), e.g. GenEval's object counts and colours.
Subclasses implement only ``_compute``;
the checks on inputs and outputs, and the handling of NaN / inf scores, live here so that every
reward (built-in, weighted sum or user function) behaves the same way.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

PIXEL_TOLERANCE = 1e-4
"""How far outside [0, 1] pixel values may be (float rounding of a decoder's output) before it is an error."""

ScoreLike = torch.Tensor | np.ndarray | Sequence[float]


class RewardError(ValueError):
    """A reward that cannot be built or that was called, or answered, the wrong way."""


@dataclass
class RewardOutput:
    """The scores of one batch.

    - ``scores``: float32 (B,), the raw scores with every non-finite entry replaced by 0.0. The
      zero exists only so the tensor can be stored and logged; it is NOT a score.
    - ``valid``: bool (B,), False where the raw score was NaN or +-inf.
    - ``raw``: float32 (B,), the scores exactly as the reward gave them.
    - ``components``: for a weighted sum, each part's raw scores (B,) under its name; else ``{}``.

    Invalid samples must be masked out by the trainer (no advantage, no loss, not in the reward
    statistics), never treated as a reward of 0: a 0 would be a real, and wrong, learning signal.
    """

    scores: torch.Tensor
    valid: torch.Tensor
    raw: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_raw(cls, raw: torch.Tensor, components: dict[str, torch.Tensor] | None = None) -> RewardOutput:
        """Build the output of raw float32 (B,) scores; the valid mask is where they are finite."""
        valid = torch.isfinite(raw)
        scores = torch.where(valid, raw, torch.zeros_like(raw))
        return cls(scores=scores, valid=valid, raw=raw, components=dict(components or {}))

    @property
    def num_invalid(self) -> int:
        """How many samples have a NaN / inf score."""
        return int((~self.valid).sum().item())

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def cat(items: Sequence[RewardOutput]) -> RewardOutput:
        """The outputs of consecutive batches as one, in their order (components joined by name)."""
        names = list(dict.fromkeys(k for item in items for k in item.components))
        return RewardOutput(scores=torch.cat([o.scores for o in items]), valid=torch.cat([o.valid for o in items]),
                            raw=torch.cat([o.raw for o in items]),
                            components={k: torch.cat([o.components[k] for o in items]) for k in names})


class Reward(abc.ABC):
    """Base class of rewards. Call it as ``reward(images, prompts) -> RewardOutput``.

    Subclasses set ``name`` and implement ``_compute``; they may override ``validate_prompts``
    (called by the trainer before any model is loaded or any image sampled, so that a bad prompt
    fails in a second rather than after minutes of setup) and ``to`` (to move a heavy model).
    """

    name: str = "reward"
    uses_metadata: bool = False  # True: _compute(images, prompts, metadata) with one dict per image
    # True: scoring mostly waits (a server, another device) or costs what its author knows and we do
    # not (a user's function), so ``--reward-overlap auto`` scores it beside the sampling
    overlaps_sampling: bool = False

    @abc.abstractmethod
    def _compute(self, images: torch.Tensor, prompts: list[str], *metadata: list[dict[str, Any]]) -> ScoreLike:
        """images float (B, 3, H, W) in [0, 1], prompts list of B strings -> B scores.

        Runs under ``torch.no_grad``. May return a tensor (any device), a numpy array or a list
        of numbers, of shape (B,) or (B, 1); NaN / inf are allowed and mark the sample invalid.
        A reward with ``uses_metadata`` gets a third argument: B dicts, each prompt's metadata.
        """

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        """Raise if this reward cannot score some prompt; the default accepts every prompt."""
        return None

    def to(self, device: str | torch.device) -> Reward:
        """Move whatever the reward holds to ``device``; returns ``self``. Default: nothing to move."""
        return self

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput:
        """Score ``images`` float (B, 3, H, W) in [0, 1] against ``prompts`` (B strings); ``metadata``:
        B dicts, the prompts' metadata (empty dicts when not given), seen by rewards that use it."""
        images, prompt_list = self._check_inputs(images, prompts)
        return self._evaluate(images, prompt_list, self._check_metadata(metadata, len(prompt_list)))

    def _check_metadata(self, metadata: Sequence[Mapping[str, Any]] | None, batch: int) -> list[dict[str, Any]]:
        if metadata is None:
            return [{} for _ in range(batch)]
        items = list(metadata)
        if len(items) != batch or not all(isinstance(m, Mapping) for m in items):
            raise RewardError(f"reward {self.name!r} got metadata for {len(items)} prompts, not {batch} dicts "
                              "(one per image)")
        return [dict(m) for m in items]

    def _evaluate(self, images: torch.Tensor, prompts: list[str],
                  metadata: list[dict[str, Any]] | None = None) -> RewardOutput:
        """Checked inputs -> output; composite rewards override this instead of ``__call__``."""
        with torch.no_grad():
            if self.uses_metadata:
                out = self._compute(images, prompts, metadata if metadata is not None else [{} for _ in prompts])
            else:
                out = self._compute(images, prompts)
        return RewardOutput.from_raw(scores_to_tensor(out, images.shape[0], self.name))

    def _check_inputs(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        """Check the calling convention; return the images clamped to [0, 1] and the prompts as a list."""
        who = f"reward {self.name!r}"
        if not isinstance(images, torch.Tensor):
            raise RewardError(f"{who} expects images as a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise RewardError(
                f"{who} expects float images with values in [0, 1], got dtype {images.dtype} "
                "(for uint8 images divide by 255)"
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise RewardError(f"{who} expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise RewardError(f"{who} expects prompts as a list of strings, got {type(prompts).__name__}")
        prompt_list = list(prompts)
        if not all(isinstance(p, str) for p in prompt_list):
            raise RewardError(f"{who} expects every prompt to be a string")
        batch = images.shape[0]
        if len(prompt_list) != batch:
            raise RewardError(f"{who} got {batch} images but {len(prompt_list)} prompts; give one prompt per image")
        if batch == 0:
            return images, prompt_list
        pixels = images.detach()
        if not bool(torch.isfinite(pixels).all()):
            raise RewardError(f"{who} got images with NaN or inf pixel values")
        lo, hi = float(pixels.min()), float(pixels.max())
        if lo < -PIXEL_TOLERANCE or hi > 1 + PIXEL_TOLERANCE:
            raise RewardError(
                f"{who} expects pixel values in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                "(images in [-1, 1] map to [0, 1] with (x + 1) / 2)"
            )
        # Values within the tolerance are rounding noise; clamping means no reward ever sees them.
        return images.clamp(0.0, 1.0), prompt_list


def scores_to_tensor(out: object, batch: int, name: str) -> torch.Tensor:
    """Convert a reward's answer (tensor, numpy array or list; (B,) or (B, 1)) to float32 CPU (B,).

    Raises :class:`RewardError` naming the reward when the answer is not B numbers.
    """
    if isinstance(out, torch.Tensor):
        if out.is_complex():
            raise RewardError(f"reward {name!r} returned complex scores")
        t = out.detach().to("cpu", torch.float32)
    elif isinstance(out, np.ndarray | list | tuple):
        items = out if isinstance(out, np.ndarray) else [_plain(x) for x in out]
        if isinstance(out, np.ndarray) and out.dtype.kind not in "biuf":
            raise RewardError(f"reward {name!r} returned a numpy array of dtype {out.dtype}; expected numbers")
        if not isinstance(out, np.ndarray) and any(isinstance(x, str | bytes) for x in items):
            # np.asarray would silently parse "0.5"; a string score is a bug in the reward.
            raise RewardError(f"reward {name!r} returned strings; expected one number per image")
        try:
            t = torch.tensor(np.asarray(items, dtype=np.float64), dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise RewardError(f"reward {name!r} returned scores that are not numbers: {e}") from e
    else:
        raise RewardError(
            f"reward {name!r} returned {type(out).__name__}; expected a tensor, numpy array or list with one "
            f"score per image ({batch})"
        )
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1 or t.shape[0] != batch:
        count = t.numel()
        raise RewardError(
            f"reward {name!r} returned {count} scores for {batch} images "
            f"(shape {tuple(t.shape)}; expected ({batch},) or ({batch}, 1))"
        )
    return t.contiguous()


def _plain(x: object) -> object:
    """A list element as something numpy converts: tensors (any device) become numpy."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return x


class WeightedSum(Reward):
    """sum_i w_i * r_i of several rewards, e.g. ``shapeworld-alignment+0.1*jpeg-compressibility``.

    A sample is valid only if every part's score is (and the sum is finite); ``components`` of the
    output holds each part's raw scores (B,) under the part's name, for logging.
    """

    def __init__(self, terms: Sequence[tuple[float, Reward]], name: str) -> None:
        if not terms:
            raise RewardError(f"weighted reward {name!r} has no terms")
        names = [r.name for _, r in terms]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise RewardError(
                f"reward spec {name!r} uses {', '.join(map(repr, repeated))} more than once; add the weights instead"
            )
        self.terms = [(float(w), r) for w, r in terms]
        self.name = name
        self.uses_metadata = any(r.uses_metadata for _, r in self.terms)
        self.overlaps_sampling = any(r.overlaps_sampling for _, r in self.terms)

    def _compute(self, images: torch.Tensor, prompts: list[str], *metadata: list[dict[str, Any]]) -> torch.Tensor:
        return self._evaluate(images, prompts, *metadata).raw

    def _evaluate(self, images: torch.Tensor, prompts: list[str],
                  metadata: list[dict[str, Any]] | None = None) -> RewardOutput:
        batch = images.shape[0]
        raw = torch.zeros(batch, dtype=torch.float32)
        valid = torch.ones(batch, dtype=torch.bool)
        components: dict[str, torch.Tensor] = {}
        for weight, reward in self.terms:
            part = reward(images, prompts, metadata)
            raw = raw + weight * part.raw  # NaN / inf propagate into raw, which must show them
            valid &= part.valid
            components[reward.name] = part.raw
        # A part's invalid score already makes the sum non-finite; the explicit AND keeps the rule
        # "valid only if every part is valid" independent of float arithmetic.
        valid &= torch.isfinite(raw)
        scores = torch.where(valid, raw, torch.zeros_like(raw))
        return RewardOutput(scores=scores, valid=valid, raw=raw, components=components)

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        for _, reward in self.terms:
            reward.validate_prompts(prompts)

    def to(self, device: str | torch.device) -> WeightedSum:
        for _, reward in self.terms:
            reward.to(device)
        return self


class PromptMetadataReward(Reward):
    """``reward`` handed each prompt's metadata, looked up by prompt text in ``table`` (prompt -> dict;
    a prompt not in it gets ``{}``), wherever it is called with prompts alone (training, evaluation,
    best-of-n). Metadata given explicitly is passed on as it is."""

    def __init__(self, reward: Reward, table: Mapping[str, Mapping[str, Any]]) -> None:
        self.inner = reward
        self.table = table
        self.name = reward.name
        self.uses_metadata = reward.uses_metadata
        self.overlaps_sampling = reward.overlaps_sampling

    def __call__(self, images: torch.Tensor, prompts: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> RewardOutput:
        if metadata is None:
            metadata = [self.table.get(p, {}) for p in prompts] if not isinstance(prompts, str) else None
        return self.inner(images, prompts, metadata)

    def _compute(self, images: torch.Tensor, prompts: list[str], *metadata: list[dict[str, Any]]) -> ScoreLike:
        return self.inner._compute(images, prompts, *metadata)

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        self.inner.validate_prompts(prompts)

    def to(self, device: str | torch.device) -> PromptMetadataReward:
        self.inner.to(device)
        return self
