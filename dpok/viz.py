"""Image grids a person can look at: one row per prompt, the prompt written above its row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

LABEL_HEIGHT = 14


def prompt_grid(rows: list[np.ndarray], labels: list[str], scale: int = 2, pad: int = 2) -> Image.Image:
    """``rows[i]``: images (N, H, W, 3) in [0, 1] float or uint8; returns one RGB image."""
    if len(rows) != len(labels):
        raise ValueError(f"{len(rows)} rows of images but {len(labels)} labels")
    n = max(len(r) for r in rows)
    h, w = rows[0].shape[1] * scale, rows[0].shape[2] * scale
    width = n * (w + pad) + pad
    grid = Image.new("RGB", (width, len(rows) * (h + LABEL_HEIGHT + pad) + pad), (32, 32, 32))
    draw = ImageDraw.Draw(grid)
    for i, (row, label) in enumerate(zip(rows, labels)):
        y = pad + i * (h + LABEL_HEIGHT + pad)
        draw.text((pad, y + 1), label, fill=(230, 230, 230))
        for j, img in enumerate(row):
            a = np.asarray(img)
            if a.dtype != np.uint8:
                a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
            tile = Image.fromarray(a).resize((w, h), Image.NEAREST)
            grid.paste(tile, (pad + j * (w + pad), y + LABEL_HEIGHT))
    return grid


def save_prompt_grid(rows: list[np.ndarray], labels: list[str], path: str | Path, scale: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prompt_grid(rows, labels, scale=scale).save(path)
    return path
