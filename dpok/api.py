"""The Python API, for notebooks and scripts: ``dpok.train(config, reward=fn)``.

A run from Python is the run ``dpok train`` makes (same run folder, checkpoints, grids, LoRA,
model card), with three things the command line cannot give:

- ``reward``: any callable ``fn(images, prompts)`` or ``fn(images, prompts, metadata)`` returning
  one score per image (images: float tensor (B, 3, H, W) in [0, 1]; metadata: one dict per image,
  from a ``.jsonl`` prompt file or the prompt function), or a :class:`~dpok.rewards.Reward`;
- ``prompts``: a list of prompts, or a function ``fn(rng) -> prompt`` or ``(prompt, metadata)``
  drawing each training prompt with the numpy generator it is given (so that a resumed run draws
  the same ones);
- ``pipeline``: a diffusers pipeline object already in memory (it is changed in place: DDIM
  scheduler, LoRA on its UNet).

Example::

    import dpok

    def redness(images, prompts):
        return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))

    result = dpok.train(dpok.TrainConfig(prompt=["a red circle"], rounds=2), reward=redness)
    print(result.reward_before, result.reward_after, result.output_dir)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .config import TrainConfig
from .options import option_names, replace_options
from .prompts import PromptFunction
from .rewards import Reward
from .rewards.custom import CustomReward
from .trainer import RunResult, Trainer

RewardLike = Reward | Callable[..., Any] | str


def _reward(reward: RewardLike | None, cfg: TrainConfig) -> tuple[Reward | None, TrainConfig]:
    """A reward object for the trainer (None: the config's named reward) and the config naming it."""
    if reward is None:
        return None, cfg
    if isinstance(reward, str):
        return None, replace_options(cfg, reward=reward)
    if isinstance(reward, Reward):
        return reward, replace_options(cfg, reward=f"python:{reward.name}")
    if not callable(reward):
        raise TypeError(f"reward must be a function f(images, prompts[, metadata]) -> scores, a dpok Reward or a "
                        f"reward name, not {type(reward).__name__}")
    name = f"python:{getattr(reward, '__qualname__', None) or type(reward).__name__}"
    return CustomReward(name, reward), replace_options(cfg, reward=name)


def train(config: TrainConfig | None = None, *, reward: RewardLike | None = None,
          prompts: Sequence[str] | PromptFunction | None = None, pipeline: Any = None,
          config_format: str = "yaml", **settings: Any) -> RunResult:
    """Fine-tune and return the :class:`~dpok.trainer.RunResult` (``output_dir`` is the run folder,
    ``reward_before`` / ``reward_after`` the mean rewards of the fixed-seed evaluation, ``files``
    what was written).

    ``config``: the settings (default :class:`~dpok.config.TrainConfig`'s); ``settings`` override
    its options by their flat names, as on the command line (``rounds=5``,
    ``clip_range=1e-3``). ``reward``, ``prompts``, ``pipeline``: see the module's
    documentation. The settings are validated before anything loads, as on the command line.
    """
    cfg = config if config is not None else TrainConfig()
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"config must be a dpok.TrainConfig, not {type(cfg).__name__}")
    unknown = sorted(set(settings) - set(option_names(TrainConfig)))
    if unknown:
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; the settings are the options of 'dpok train' "
                        "(e.g. rounds, learning_rate, clip_range)")
    cfg = replace_options(cfg, **settings)
    reward_object, cfg = _reward(reward, cfg)
    prompt_fn = None
    if callable(prompts):
        prompt_fn = prompts
    elif prompts is not None:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts or a function fn(rng) -> prompt, not one string")
        cfg = replace_options(cfg, prompt=list(prompts))
    if pipeline is not None and cfg.model == TrainConfig.model:
        # the run's records name the pipeline it trained, not the default model
        source = getattr(getattr(pipeline, "config", None), "_name_or_path", "") or ""
        cfg = replace_options(cfg, model=str(source) or f"in-memory {type(pipeline).__name__}")
    cfg.validate()
    return Trainer(cfg, config_format, pipeline=pipeline, reward=reward_object, prompt_fn=prompt_fn).run()
