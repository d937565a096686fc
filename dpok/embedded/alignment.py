"""The learned ShapeWorld alignment reward model (the analogue of a reward model learned from labels).

A small fully convolutional network looks at a 64x64 image as an 8x8 grid of 8-pixel cells and
predicts, for every cell, which of the 24 (color, shape) types has its centroid there (or none),
and where in the cell (a detector; object centroids are at least 12 px apart, so a cell holds at
most one). From the per-cell probabilities p_k(c) it derives, per type k,

- the distribution of its count, counts 0 to 4 and "5 or more" (a Poisson-binomial over cells),
- its expected centroid (probability-weighted cell centres plus the predicted offsets).

The alignment of an image with a prompt is the probability the model gives to the prompt being
exactly true:

    log r(x, z) = sum_k log P(count_k = n_k(z) | x)  [+ log Phi(margin / s) for a relation]

where n_k(z) is the prompt's count of type k (0 for every type it does not name: nothing else may
be in the image) and margin is the predicted centroid gap along the relation's axis. The reward
``shapeworld-alignment`` is r in [0, 1]; its log is available as ``log_prob``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..shapeworld import ALL_PAIRS, ParsedPrompt

NUM_COUNT_CLASSES = 6  # counts 0..4 and "5 or more": "four" must mean exactly four
GRID = 8  # cells per side
CELL = 64 // GRID
RELATION_SCALE = 1.5 / 64  # std of the centroid-gap noise in Phi(margin / s): ~1.5 px
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_PAIR_INDEX = {p: i for i, p in enumerate(ALL_PAIRS)}


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class AlignmentNet(nn.Module):
    """64x64x3 image -> per-cell type logits (B, 25, 8, 8) (0 = no object) and offsets (B, 2, 8, 8)."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        if width < 16 or width % 16:
            raise ValueError(f"AlignmentNet width must be a positive multiple of 16 (group norms), got {width}")
        w = width
        self.features = nn.Sequential(
            _block(3, w, 2),  # 32 px
            _block(w, 3 * w // 2, 1),
            _block(3 * w // 2, 2 * w, 2),  # 16 px
            _block(2 * w, 2 * w, 1),
            _block(2 * w, 3 * w, 2),  # 8 x 8 cells; receptive field ~59 px
            _block(3 * w, 3 * w, 1),
            _block(3 * w, 3 * w, 1),
        )
        self.head = nn.Conv2d(3 * w, len(ALL_PAIRS) + 1 + 2, 1)
        self.config = {"width": width}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, 64, 64) in [0, 1] -> cell logits (B, 25, 8, 8), offsets in [0, 1] (B, 2, 8, 8)."""
        h = self.head(self.features(images * 2 - 1))
        return h[:, : len(ALL_PAIRS) + 1], torch.sigmoid(h[:, len(ALL_PAIRS) + 1 :])


def count_log_probs(cell_logits: torch.Tensor) -> torch.Tensor:
    """log P(count_k = n), n = 0..4 and ">= 5", per type: (B, 24, 6), from (B, 25, G, G) logits.

    Each cell independently holds type k with probability p_k(c); the count is the
    Poisson-binomial sum over cells, computed by the usual recursion (in float64).
    """
    p = torch.softmax(cell_logits.double(), dim=1)[:, 1:].flatten(2)  # (B, 24, cells)
    dist = torch.zeros(*p.shape[:2], NUM_COUNT_CLASSES, dtype=torch.float64, device=p.device)
    dist[..., 0] = 1.0
    for c in range(p.shape[-1]):
        q = p[..., c : c + 1]
        shifted = torch.cat([torch.zeros_like(dist[..., :1]), dist[..., :-1]], dim=-1)
        shifted[..., -1] = shifted[..., -1] + dist[..., -1]  # the last class, ">= 5", absorbs
        dist = dist * (1 - q) + shifted * q
    return torch.log(dist.clamp_min(1e-300)).float()


def expected_positions(cell_logits: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Probability-weighted centroid of each type, (x, y) / 64: (B, 24, 2)."""
    p = torch.softmax(cell_logits.float(), dim=1)[:, 1:]  # (B, 24, G, G)
    g = cell_logits.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(g, device=p.device), torch.arange(g, device=p.device), indexing="ij")
    cx = (xs[None] + offsets[:, 0]) / g  # (B, G, G)
    cy = (ys[None] + offsets[:, 1]) / g
    w = p / p.sum((-1, -2), keepdim=True).clamp_min(1e-12)
    return torch.stack([(w * cx[:, None]).sum((-1, -2)), (w * cy[:, None]).sum((-1, -2))], dim=-1)


def count_targets(parsed: ParsedPrompt, classes: int = NUM_COUNT_CLASSES) -> torch.Tensor:
    """The prompt's count class of every type, long (24,) (the last class means "that many or more")."""
    t = torch.zeros(len(ALL_PAIRS), dtype=torch.long)
    for pair, n in parsed.objects.items():
        t[_PAIR_INDEX[pair]] = min(n, classes - 1)
    return t


def alignment_log_prob(
    cell_logits: torch.Tensor, offsets: torch.Tensor, prompts: list[ParsedPrompt], term_floor: float | None = None
) -> torch.Tensor:
    """log r(x, z) of the module docstring, shape (B,). Inputs as returned by ``AlignmentNet``.

    ``term_floor`` (a log-probability, e.g. log 1e-4): each term (one type's count, the relation)
    is at least this, so an image that gets one group right and another wrong scores above one
    that gets both wrong: partial credit where the exact r is ~0 for every image.
    """
    targets = torch.stack([count_targets(p) for p in prompts]).to(cell_logits.device)
    terms = count_log_probs(cell_logits).gather(-1, targets[..., None]).squeeze(-1)  # (B, 24)
    if term_floor is not None:
        terms = terms.clamp_min(term_floor)
    out = terms.sum(-1)
    if all(p.relation is None for p in prompts):
        return out
    positions = expected_positions(cell_logits, offsets)
    normal = torch.distributions.Normal(0.0, 1.0)
    for i, p in enumerate(prompts):
        if p.relation is None:
            continue
        a, b = (_PAIR_INDEX[g.pair] for g in p.groups)
        axis = 0 if p.relation == "left of" else 1
        margin = (positions[i, b, axis] - positions[i, a, axis]) / RELATION_SCALE
        relation = torch.log(normal.cdf(margin).clamp_min(1e-12))
        out[i] = out[i] + (relation if term_floor is None else relation.clamp_min(term_floor))
    return out


class AlignmentRewardModel(nn.Module):
    """The trained network plus its scoring rule; loads and saves safetensors + JSON."""

    def __init__(self, net: AlignmentNet) -> None:
        super().__init__()
        self.net = net

    @torch.no_grad()
    def log_prob(self, images: torch.Tensor, prompts: list[ParsedPrompt],
                 term_floor: float | None = None) -> torch.Tensor:
        """images (B, 3, 64, 64) in [0, 1]; returns log r, shape (B,) (``term_floor``: see
        :func:`alignment_log_prob`)."""
        if images.shape[-2:] != (64, 64):
            images = nn.functional.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
        logits, offsets = self.net(images)
        return alignment_log_prob(logits, offsets, prompts, term_floor)

    def score(self, images: torch.Tensor, prompts: list[ParsedPrompt]) -> torch.Tensor:
        """r in [0, 1], shape (B,)."""
        return self.log_prob(images, prompts).exp()

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, folder / WEIGHTS_NAME)
        meta = {
            "model_type": "shapeworld-alignment",
            **self.net.config,
            "pairs": [list(p) for p in ALL_PAIRS],
            "count_classes": NUM_COUNT_CLASSES,
            "grid": GRID,
            "relation_scale": RELATION_SCALE,
            "output": "probability in [0, 1] that the prompt is exactly true of the image",
        }
        (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> AlignmentRewardModel:
        folder = Path(folder)
        weights, config = folder / WEIGHTS_NAME, folder / CONFIG_NAME
        for f in (weights, config):
            if not f.is_file():
                raise FileNotFoundError(
                    f"alignment reward model file {f} is missing; train it with "
                    "'dpok pretrain --stages reward' or point to a folder that has it"
                )
        try:
            meta = json.loads(config.read_text())
            net = AlignmentNet(width=int(meta["width"]))
            net.load_state_dict(load_file(weights))
        except Exception as e:  # corrupt JSON, truncated safetensors, wrong shapes
            raise ValueError(f"cannot load the alignment reward model from {folder}: {e}") from e
        model = cls(net).to(device).eval()
        model.requires_grad_(False)
        return model

