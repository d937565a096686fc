"""The ShapeWorld domain (see :mod:`dpok.domains`): its grammar, prompt sets, default prompt and
the measures that share no weights with any learned model (the geometric judge, the clean-shape
share, the Fréchet distance of hand-built features to true renders)."""

from __future__ import annotations

import numpy as np
import torch

from ..domains import Domain
from .distribution import prompt_sets
from .grammar import PromptError, parse_prompt
from .judge import FLAWS, flaws, judge
from .quality import frechet_distance, image_features
from .render import render_prompt


def judgement(images: torch.Tensor, prompt: str, seed: int) -> dict[str, float]:
    """The geometric judge's aligned and clean shares of images (N, 3, H, W) in [0, 1], the share
    of images with each of its flaws (``judge_missing``, ``judge_extra``, ... as
    :func:`dpok.shapeworld.judge.flaws` names them; an image may have several), and the Fréchet
    distance of hand-built features to max(N, 32) true renders of the prompt (drawn with ``seed``)."""
    arrays = images.permute(0, 2, 3, 1).numpy()
    parsed = parse_prompt(prompt)
    rng = np.random.default_rng(seed)
    renders = [render_prompt(parsed, rng)[0] for _ in range(max(len(arrays), 32))]
    fd = frechet_distance(np.stack([image_features(a) for a in arrays]), np.stack([image_features(r) for r in renders]))
    seen = [judge(a) for a in arrays]
    found = [flaws(j, parsed) for j in seen]
    return {"judge_aligned": float(np.mean([not f for f in found])),
            "clean_share": float(np.mean([j.clean for j in seen])), "frechet": fd,
            **{f"judge_{name}": float(np.mean([name in f for f in found])) for name in FLAWS}}


# a rare pair with a count, which the embedded model gets right about half the time
DOMAIN = Domain(name="shapeworld", default_prompts=("two white triangles",), eval_sets=("seen", "unseen"),
                prompt_sets=prompt_sets, check_prompt=parse_prompt, measures=judgement, prompt_error=PromptError)
