"""CLIP-based rewards: ``clip-score``, ``pickscore``, ``hpsv2`` and ``aesthetic``.

All four embed images (and prompts) with a transformers ``CLIPModel``:

- image embedding u = normalize(visual_projection(vision_model(preprocess(x)).pooler_output)), (B, E);
- text embedding  v = normalize(text_projection(text_model(tokens).pooler_output)), (B, E);

and score

- ``clip-score``: cos(u, v) = u . v in [-1, 1] (default model openai/clip-vit-large-patch14). This
  is the raw cosine; torchmetrics' CLIPScore reports 100 * max(cos, 0), Hessel et al.'s CLIP-S
  2.5 * max(cos, 0). Typical matching image/prompt pairs give 0.25-0.35.
- ``pickscore``: logit_scale.exp() * cos(u, v) (PickScore v1: exp(logit_scale) = 100, so scores
  are about 18-23); the model is yuvalkirstain/PickScore_v1, its tokenizer and preprocessing
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K (option ``processor``) unless the model folder has its own.
- ``hpsv2``: cos(u, v) with the HPS v2 / v2.1 fine-tune of OpenCLIP ViT-H-14, typically
  0.2-0.3. The official weights are OpenCLIP pickles: convert them once with
  ``python -m dpok.rewards.convert hpsv2 ...`` and pass the folder as ``model``.
- ``aesthetic``: the LAION improved aesthetic predictor, ScoreHead(u) with u from CLIP ViT-L/14
  (scores roughly 1-10; a typical photo 4-6). It ignores the prompt. The head comes from a
  safetensors file (option ``head``; convert the official .pth with ``... convert aesthetic-head``).

Options: ``model`` (hub id or local folder of a transformers CLIP model with safetensors weights),
``head`` / ``processor`` where stated, ``batch_size`` (images per forward pass), ``device``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import RewardError
from .preprocess import ImageTransform
from .pretrained import (
    CONVERT,
    PROCESSOR_PATTERNS,
    PretrainedReward,
    ScoreHead,
    load_head,
    require_safetensors,
    resolve_model_dir,
)
from .registry import register_reward

CLIP_L14 = "openai/clip-vit-large-patch14"
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


def load_clip(reward: str, folder: Path, device: torch.device) -> Any:
    """transformers ``CLIPModel`` from ``folder`` (safetensors only), eval mode, on ``device``."""
    from transformers import CLIPModel

    require_safetensors(reward, folder)
    try:
        model = CLIPModel.from_pretrained(str(folder), use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise RewardError(f"reward {reward!r}: cannot load a CLIP model from {str(folder)!r}: {e}") from e
    return model.eval().to(device)


def load_tokenizer(reward: str, folder: Path) -> Any:
    """The tokenizer saved in ``folder``; RewardError naming the folder if there is none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RewardError(f"reward {reward!r}: cannot load a tokenizer from {str(folder)!r}: {e}") from e


def clip_image_embeds(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """L2-normalised projected image embeddings (B, E) of preprocessed pixels (B, 3, S, S)."""
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    return F.normalize(model.visual_projection(pooled).float(), dim=-1)


def clip_text_embeds(model: Any, tokenizer: Any, prompts: list[str], device: torch.device) -> torch.Tensor:
    """L2-normalised projected text embeddings (B, E) of ``prompts`` (truncated to the model's context)."""
    max_length = min(int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings))
    tokens = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    pooled = model.text_model(
        input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)
    ).pooler_output
    return F.normalize(model.text_projection(pooled).float(), dim=-1)


class ClipReward(PretrainedReward):
    """Base of the CLIP rewards: loads CLIP (+ tokenizer, + preprocessing) from ``model``.

    ``_score`` is ``scale * cos(u, v)`` with ``scale`` 1 here; subclasses change the scale or the head.
    """

    name = "clip-score"
    uses_text = True
    hint = ""
    """Appended to the error when the model is not available."""

    def __init__(
        self,
        model: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        processor: str | Path | None = None,
    ) -> None:
        super().__init__(device, batch_size)
        self.source = str(model)
        self.processor_source = str(processor) if processor is not None else None
        self.model: Any = None
        self.tokenizer: Any = None
        self.transform = ImageTransform()

    def _load(self) -> None:
        folder = resolve_model_dir(self.name, self.source, hint=self.hint)
        self.model = load_clip(self.name, folder, self.device)
        proc = self._processor_dir(folder)
        image_size = int(self.model.config.vision_config.image_size)
        self.transform = ImageTransform.from_folder(proc, image_size)
        if self.uses_text:
            self.tokenizer = load_tokenizer(self.name, proc)

    def _processor_dir(self, model_dir: Path) -> Path:
        """Where the tokenizer and preprocessor config are: ``processor`` if given, else the model folder."""
        if self.processor_source is not None:
            return resolve_model_dir(self.name, self.processor_source, option="processor", patterns=PROCESSOR_PATTERNS)
        return model_dir

    def _modules(self) -> list[nn.Module]:
        return [self.model]

    def _scale(self) -> torch.Tensor | float:
        return 1.0

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        u = clip_image_embeds(self.model, self.transform(images))
        v = clip_text_embeds(self.model, self.tokenizer, prompts, self.device)
        return self._scale() * (u * v).sum(dim=-1)


class PickScoreReward(ClipReward):
    """PickScore: ``exp(logit_scale) * cos(u, v)`` (B,), about 18-23 for PickScore v1."""

    name = "pickscore"

    def _processor_dir(self, model_dir: Path) -> Path:
        # The official PickScore repo ships no tokenizer: it uses the LAION ViT-H-14 one.
        if self.processor_source is None and any((model_dir / f).is_file() for f in _TOKENIZER_FILES):
            return model_dir
        source = self.processor_source or PICKSCORE_PROCESSOR
        return resolve_model_dir(self.name, source, option="processor", patterns=PROCESSOR_PATTERNS)

    def _scale(self) -> torch.Tensor | float:
        return self.model.logit_scale.exp().float()


class HPSv2Reward(ClipReward):
    """HPS v2: cos(u, v) (B,) with the HPS v2(.1) CLIP ViT-H-14 converted to a transformers folder."""

    name = "hpsv2"
    hint = f"Make the folder from the official OpenCLIP checkpoint with `{CONVERT} hpsv2 HPS_v2.1_compressed.pt OUT_FOLDER`."


class AestheticReward(ClipReward):
    """LAION aesthetic predictor: ScoreHead(u) (B,), u the normalised CLIP image embedding; prompts are ignored."""

    name = "aesthetic"
    uses_text = False

    def __init__(
        self,
        model: str | Path,
        head: str | Path,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        super().__init__(model, device, batch_size)
        self.head_path = str(head)
        self.head: ScoreHead | None = None

    def _load(self) -> None:
        # The head first: it is small and the likelier one to be missing, so fail before loading CLIP.
        self.head = load_head(self.name, self.head_path).to(self.device)
        super()._load()
        width = int(self.model.config.projection_dim)
        if self.head.layers[0].in_features != width:
            raise RewardError(
                f"reward {self.name!r}: head {self.head_path!r} expects {self.head.layers[0].in_features}-d embeddings "
                f"but CLIP {self.source!r} makes {width}-d ones (the LAION head needs CLIP ViT-L/14)"
            )

    def _modules(self) -> list[nn.Module]:
        return [self.model, self.head]

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        u = clip_image_embeds(self.model, self.transform(images))
        return self.head(u)


@register_reward(
    "clip-score",
    "cosine similarity in [-1, 1] of CLIP image and prompt embeddings (options model=HUB_ID|FOLDER, "
    f"default {CLIP_L14})",
)
def clip_score(model: str | Path = CLIP_L14, device: str | torch.device = "cpu", batch_size: int = 16) -> ClipReward:
    """The ``clip-score`` reward: cos(image, prompt) of a transformers CLIP model."""
    return ClipReward(model, device, batch_size)


@register_reward(
    "pickscore",
    f"PickScore v1: 100 * cos(image, prompt), about 18-23 (options model, processor; default {PICKSCORE_MODEL})",
)
def pickscore(
    model: str | Path = PICKSCORE_MODEL,
    processor: str | Path | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> PickScoreReward:
    """The ``pickscore`` reward; the tokenizer comes from ``processor``, the model folder, or the LAION ViT-H-14 repo."""
    return PickScoreReward(model, device, batch_size, processor=processor)


@register_reward("hpsv2", "HPS v2 human preference: cos(image, prompt), about 0.2-0.3 (option model=FOLDER, converted)")
def hpsv2(model: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 16) -> HPSv2Reward:
    """The ``hpsv2`` reward; ``model`` is a transformers CLIP folder made by ``convert hpsv2`` (required)."""
    if model is None:
        raise RewardError(
            "reward 'hpsv2' needs model=FOLDER: a transformers CLIP folder converted from the official OpenCLIP "
            f"checkpoint with `{CONVERT} hpsv2 HPS_v2.1_compressed.pt OUT_FOLDER` (see docs/rewards.md)"
        )
    return HPSv2Reward(model, device, batch_size)


@register_reward(
    "aesthetic",
    "LAION aesthetic predictor on CLIP ViT-L/14, about 1-10; ignores the prompt (options head=FILE.safetensors, model)",
)
def aesthetic(
    head: str | Path | None = None,
    model: str | Path = CLIP_L14,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> AestheticReward:
    """The ``aesthetic`` reward; ``head`` (required) is the predictor's MLP as safetensors."""
    if head is None:
        raise RewardError(
            "reward 'aesthetic' needs head=FILE.safetensors: convert the LAION predictor "
            f"(sac+logos+ava1-l14-linearMSE.pth) once with `{CONVERT} aesthetic-head IN.pth OUT.safetensors`"
        )
    return AestheticReward(model, head, device, batch_size)
