"""CLIP / BLIP image preprocessing with torch ops (no torchvision, no PIL round trip).

The pretrained rewards see images as float (B, 3, H, W) in [0, 1]. Their models expect what the
Hugging Face image processors produce: the shortest side resized to ``size`` (bicubic), a center
crop of ``crop`` x ``crop``, then ``(x - mean) / std`` per channel. :class:`ImageTransform` does
exactly that on tensors, so it runs on the reward's device and on a whole batch at once.

It differs from a PIL-based processor only by the resampling kernel's details (torch's bicubic
with antialiasing vs PIL's bicubic on uint8 pixels): on a 512 -> 224 resize the pixels differ from
PIL's by about 1e-3 on average (a quarter of one 8-bit level, at most ~4e-3), so scores are close
to, but not bit for bit those of, the reference implementations.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of OpenAI CLIP's training images; also what BLIP and ImageReward normalise with."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel standard deviation matching :data:`CLIP_MEAN`."""
CLIP_SIZE = 224


@dataclass(frozen=True)
class ImageTransform:
    """Resize (shortest side -> ``size``, bicubic, antialiased), center crop ``crop``, normalise.

    ``__call__`` maps float (B, 3, H, W) in [0, 1] to float (B, 3, crop, crop) equal to
    ``(center_crop(resize(x)) - mean) / std``.
    """

    size: int = CLIP_SIZE
    crop: int = CLIP_SIZE
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @classmethod
    def from_folder(cls, folder: str | Path | None, image_size: int | None = None) -> ImageTransform:
        """Read ``preprocessor_config.json`` in ``folder`` when there is one.

        Without one, ``size`` and ``crop`` are ``image_size`` (the vision model's input size) or
        224, and mean / std are CLIP's.
        """
        default = int(image_size) if image_size else CLIP_SIZE
        path = Path(folder) / "preprocessor_config.json" if folder is not None else None
        if path is None or not path.is_file():
            return cls(size=default, crop=default)
        cfg = json.loads(path.read_text(encoding="utf-8"))
        size = _edge(cfg.get("size"), default) if cfg.get("do_resize", True) else default
        crop = _edge(cfg.get("crop_size"), size) if cfg.get("do_center_crop", True) else size
        mean = _triple(cfg.get("image_mean"), CLIP_MEAN)
        std = _triple(cfg.get("image_std"), CLIP_STD)
        return cls(size=size, crop=crop, mean=mean, std=std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        h, w = x.shape[-2:]
        short = min(h, w)
        if short != self.size:
            new_h = max(1, round(h * self.size / short))
            new_w = max(1, round(w * self.size / short))
            # antialias=True low-pass filters on downscaling, as PIL's resize does; without it a
            # 512 -> 224 resize aliases and the reward sees different pixels than the model was trained on.
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
            # Bicubic overshoots; processors work on uint8 pixels, which clip to [0, 1].
            x = x.clamp(0.0, 1.0)
        x = center_crop(x, self.crop)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def center_crop(images: torch.Tensor, crop: int) -> torch.Tensor:
    """The central ``crop`` x ``crop`` window of (B, C, H, W); zero-pads first if an edge is shorter."""
    h, w = images.shape[-2:]
    if h < crop or w < crop:
        pad_h, pad_w = max(0, crop - h), max(0, crop - w)
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        h, w = images.shape[-2:]
    top = int(round((h - crop) / 2.0))
    left = int(round((w - crop) / 2.0))
    return images[..., top : top + crop, left : left + crop]


def _edge(value: Any, default: int) -> int:
    """A processor config's size entry (int, {"shortest_edge": n} or {"height": h, "width": w}) -> one edge."""
    if value is None:
        return default
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, dict):
        for key in ("shortest_edge", "height", "width"):
            if key in value:
                return int(value[key])
    if isinstance(value, Sequence) and value:
        return int(value[0])
    return default


def _triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(value, Sequence) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    return default
