"""Run metrics: one JSON line per round, the same scalars in the trackers (TensorBoard, wandb), and a curves plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CURVES = (("reward/mean", "reward (mean over the round's samples)"),
          ("kl/rollout", "KL bound to the pretrained model (nats, sum over steps)"),
          ("train/loss", "training loss"))


class RunLog:
    """Appends ``{"round": r, **metrics}`` to ``metrics.jsonl`` and sends the scalars and image grids
    to the trackers of ``report_to`` (see :mod:`dpok.trackers`; ``config``: the run's settings,
    stored as its hyperparameters)."""

    def __init__(self, folder: Path, report_to: Sequence[str] = ("tensorboard",),
                 config: dict[str, Any] | None = None) -> None:
        from .trackers import Trackers

        self.path = Path(folder) / "metrics.jsonl"
        self.trackers = Trackers(report_to, folder, config)

    def write(self, round_: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"round": round_, **metrics}) + "\n")
        self.trackers.log(metrics, round_)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars that are not a round's row (e.g. ``eval/*``) to the trackers only."""
        self.trackers.log(values, step)

    def log_image(self, key: str, image: np.ndarray, step: int) -> None:
        """An RGB image (H, W, 3) uint8 to the trackers."""
        self.trackers.log_image(key, image, step)

    def log_png(self, key: str, path: Path, step: int) -> None:
        """A saved image file (a grid PNG) to the trackers, as RGB."""
        from PIL import Image  # only the main process, once per grid, needs PIL here

        with Image.open(path) as image:
            self.log_image(key, np.asarray(image.convert("RGB")), step)

    def close(self) -> None:
        self.trackers.finish()


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of ``metrics.jsonl`` (none if it does not exist).

    A last line without its newline that is not JSON is a write cut short (a full disk, a killed
    process) and is left out; such a line anywhere else is a ValueError naming the file and line.
    """
    if not Path(path).is_file():
        return []
    lines = Path(path).read_text().split("\n")
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):
                break
            raise ValueError(f"{path}, line {n} is not a JSON row ({e}); remove or fix that line") from None
    return rows


def plot_curves(metrics_path: Path, out: Path) -> bool:
    """Reward, KL and loss against rounds; returns False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        return False
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.2))
    for ax, (key, title) in zip(axes, CURVES):
        points = [(r["round"], r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True
