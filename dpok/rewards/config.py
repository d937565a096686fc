"""The reward settings every command shares, and the one place a reward is built from them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..options import option
from .base import Reward
from .registry import make_reward


@dataclass
class RewardConfig:
    """Which reward, and the files or server it needs (flat options ``--reward``, ``--reward-model``, ...)."""

    title: ClassVar[str] = "reward"

    name: str = option("shapeworld-alignment", "reward name, 'module:function', or a sum like 'a+0.1*b' (see "
                                               "'dpok rewards')", name="reward")
    alignment_model: str = option("", "folder of the shapeworld-alignment reward weights (default: the shipped ones)")
    model: str = option("", "hub id or folder of the reward's model (image-reward, aesthetic, pickscore, hpsv2, "
                            "clip-score; see docs/rewards.md)", name="reward_model")
    head: str = option("", "safetensors file of the aesthetic predictor's MLP head (with --reward aesthetic)",
                       name="reward_head")
    processor: str = option("", "hub id or folder of the tokenizer/processor, if not the model's (pickscore)",
                            name="reward_processor")
    url: str = option("", "URL of a 'dpok reward-server' (with --reward http)", name="reward_url")
    token: str = option("", "shared token of the reward server (with --reward http)", name="reward_token")
    ca_file: str = option("", "PEM file of the authority that signed an https reward server's certificate (e.g. "
                              "the self-signed certificate itself)", name="reward_ca_file")

    def options(self) -> dict[str, str]:
        """The set options, as :func:`~dpok.rewards.make_reward` keywords."""
        pairs = {"alignment_model": self.alignment_model, "model": self.model, "head": self.head,
                 "processor": self.processor, "url": self.url, "token": self.token, "ca_file": self.ca_file}
        return {k: v for k, v in pairs.items() if v}

    def validate(self) -> list[str]:
        return [] if self.name.strip() else ["--reward is empty: give a reward name or spec (see 'dpok rewards')"]

    def build(self, device: str | torch.device = "cpu", **extra: Any) -> Reward:
        """The reward on ``device`` (``extra``: more :func:`make_reward` options, e.g. a device of its own)."""
        return make_reward(self.name, device=device, **self.options(), **extra)
