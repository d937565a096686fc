"""The learned ShapeWorld alignment reward model (the analogue of a reward model learned from labels).

A small CNN reads a 64x64 image and predicts, for each of the 24 (color, shape) types,

- a distribution over its count, classes 0, 1, 2, 3, "4 or more"   -> ``count_logits`` (B, 24, 5)
- where it is, when it appears once: the centroid (x, y) / 64        -> ``positions``    (B, 24, 2)

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

NUM_COUNT_CLASSES = 5
RELATION_SCALE = 1.5 / 64  # std of the centroid-gap noise in Phi(margin / s): ~1.5 px
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_PAIR_INDEX = {p: i for i, p in enumerate(ALL_PAIRS)}


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class AlignmentNet(nn.Module):
    """CNN 64x64x3 -> per-type count logits and centroid positions (about 1M parameters)."""

    def __init__(self, width: int = 32, hidden: int = 256) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _block(3, w, 1),
            _block(w, 2 * w, 2),  # 32
            _block(2 * w, 2 * w, 1),
            _block(2 * w, 4 * w, 2),  # 16
            _block(4 * w, 4 * w, 1),
            _block(4 * w, 4 * w, 2),  # 8
            _block(4 * w, 4 * w, 2),  # 4
        )
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, hidden), nn.SiLU())
        n = len(ALL_PAIRS)
        self.count_head = nn.Linear(hidden, n * NUM_COUNT_CLASSES)
        self.position_head = nn.Linear(hidden, n * 2)
        self.config = {"width": width, "hidden": hidden}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, 64, 64) in [0, 1] -> count_logits (B, 24, 5), positions (B, 24, 2)."""
        h = self.trunk(self.features(images * 2 - 1))
        n = len(ALL_PAIRS)
        counts = self.count_head(h).view(-1, n, NUM_COUNT_CLASSES)
        positions = torch.sigmoid(self.position_head(h)).view(-1, n, 2)
        return counts, positions


def count_targets(parsed: ParsedPrompt) -> torch.Tensor:
    """The prompt's count class of every type, long (24,)."""
    t = torch.zeros(len(ALL_PAIRS), dtype=torch.long)
    for pair, n in parsed.objects.items():
        t[_PAIR_INDEX[pair]] = min(n, NUM_COUNT_CLASSES - 1)
    return t


def alignment_log_prob(
    count_logits: torch.Tensor, positions: torch.Tensor, prompts: list[ParsedPrompt]
) -> torch.Tensor:
    """log r(x, z) of the module docstring, shape (B,). Inputs as returned by ``AlignmentNet``."""
    targets = torch.stack([count_targets(p) for p in prompts]).to(count_logits.device)
    log_p = torch.log_softmax(count_logits.float(), dim=-1)
    out = log_p.gather(-1, targets[..., None]).squeeze(-1).sum(-1)
    normal = torch.distributions.Normal(0.0, 1.0)
    for i, p in enumerate(prompts):
        if p.relation is None:
            continue
        a, b = (_PAIR_INDEX[g.pair] for g in p.groups)
        axis = 0 if p.relation == "left of" else 1
        margin = (positions[i, b, axis] - positions[i, a, axis]).float() / RELATION_SCALE
        out[i] = out[i] + torch.log(normal.cdf(margin).clamp_min(1e-12))
    return out


class AlignmentRewardModel(nn.Module):
    """The trained network plus its scoring rule; loads and saves safetensors + JSON."""

    def __init__(self, net: AlignmentNet) -> None:
        super().__init__()
        self.net = net

    @torch.no_grad()
    def log_prob(self, images: torch.Tensor, prompts: list[ParsedPrompt]) -> torch.Tensor:
        """images (B, 3, 64, 64) in [0, 1]; returns log r, shape (B,)."""
        if images.shape[-2:] != (64, 64):
            images = nn.functional.interpolate(images, size=(64, 64), mode="bilinear", antialias=True)
        counts, positions = self.net(images)
        return alignment_log_prob(counts, positions, prompts)

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
            net = AlignmentNet(width=int(meta["width"]), hidden=int(meta["hidden"]))
            net.load_state_dict(load_file(weights))
        except Exception as e:  # corrupt JSON, truncated safetensors, wrong shapes
            raise ValueError(f"cannot load the alignment reward model from {folder}: {e}") from e
        model = cls(net).to(device).eval()
        model.requires_grad_(False)
        return model

