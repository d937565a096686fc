"""Image quality on ShapeWorld, independent of every learned model: hand-built features and the
Fréchet distance between the feature statistics of generated images and of true renders.

Features of one image (21 numbers): the share of pixels nearest each palette colour and of
background; mean and std of each channel; mean horizontal and vertical gradient magnitude (edge
sharpness); and from the geometric judge the number of objects, their mean fill ratio and box
size, and the number of specks.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

from .grammar import COLORS
from .judge import judge

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32) / 255.0


def image_features(image: np.ndarray) -> np.ndarray:
    """(64, 64, 3) float in [0, 1] (or uint8) -> (21,) features."""
    x = np.asarray(image, dtype=np.float32)
    if x.max() > 1.0:
        x = x / 255.0
    pixels = x.reshape(-1, 3)
    foreground = pixels.max(1) > 0.3
    nearest = np.linalg.norm(pixels[:, None] - _PALETTE[None], axis=-1).argmin(1)
    colour_share = np.bincount(nearest[foreground], minlength=len(_PALETTE)) / len(pixels)
    grad = [np.abs(np.diff(x, axis=a)).mean() for a in (0, 1)]
    j = judge(x)
    fills = [o.fill for o in j.objects] or [0.0]
    sizes = [max(o.box[2:]) / 64 for o in j.objects] or [0.0]
    return np.concatenate([colour_share, [1 - foreground.mean()], x.mean((0, 1)), x.std((0, 1)), grad,
                           [len(j.objects), np.mean(fills), np.mean(sizes), j.specks]]).astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray, ridge: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (N, D), (M, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = np.eye(a.shape[1]) * ridge
    s_a = np.cov(a, rowvar=False) + eye if len(a) > 1 else eye
    s_b = np.cov(b, rowvar=False) + eye if len(b) > 1 else eye
    covmean = linalg.sqrtm(s_a @ s_b)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))
