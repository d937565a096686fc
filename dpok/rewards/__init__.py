"""Rewards: r(images, prompts) -> one score per image, with a registry and spec strings.

``make_reward("shapeworld-alignment+0.1*jpeg-compressibility")`` builds a reward;
``available_rewards()`` lists the registered names; ``register_reward`` adds one; a user function
is given as ``package.module:function``. See :mod:`dpok.rewards.base` for the calling convention.
"""

from .base import Reward, RewardError, RewardOutput, WeightedSum
from .builtin import JpegSizeReward, ShapeWorldAlignmentReward, jpeg_sizes_kb  # importing registers the built-ins
from .clip_rewards import AestheticReward, ClipReward, HPSv2Reward, PickScoreReward  # registers the CLIP rewards
from .custom import CustomReward, load_custom_reward
from .http import HttpReward, http_reward  # registers the "http" reward
from .image_reward import ImageRewardReward  # registers "image-reward"
from .registry import REWARDS, RewardRegistry, available_rewards, make_reward, parse_reward_spec, register_reward
from .server import RewardServer, decode_images, encode_images, serve

__all__ = [
    "REWARDS", "CustomReward", "JpegSizeReward", "Reward", "RewardError", "RewardOutput", "RewardRegistry",
    "ShapeWorldAlignmentReward", "WeightedSum", "available_rewards", "jpeg_sizes_kb", "load_custom_reward",
    "make_reward", "parse_reward_spec", "register_reward", "HttpReward", "http_reward", "RewardServer",
    "decode_images", "encode_images", "serve",
    "AestheticReward", "ClipReward", "HPSv2Reward", "ImageRewardReward", "PickScoreReward",
]
