"""The ``image-reward`` reward: ImageReward (Xu et al. 2023), the reward model DPOK fine-tunes against.

ImageReward is BLIP: a ViT-L/16 image encoder (224 px, 1024-d, 24 layers) and a BERT-base text
encoder (768-d, 12 layers) whose every layer cross-attends to all image tokens. The prompt's
feature at the [CLS] position goes through an MLP head (:class:`~dpok.rewards.pretrained.ScoreHead`)
and is standardised::

    image_embeds = vision(preprocess(x))                        # (B, 1 + 196, 1024)
    h = text_encoder(tokens, cross-attending image_embeds)      # (B, 35, 768), bidirectional
    r = (head(h[:, 0]) - 0.16717362830052426) / 1.0333394966054072   # (B,)

so scores are roughly standard normal over ImageReward's training prompts (higher is better).
Prompts are BERT-uncased tokens padded / truncated to 35; images are resized (shortest side 224,
bicubic), center-cropped and normalised with CLIP's mean / std.

Implementation: transformers' ``BlipVisionModel`` and ``BlipTextModel`` (the modules of
``BlipForImageTextRetrieval``'s ITM path) plus the head, in :class:`ImageRewardNet`. Weights
come from a folder in this package's format (``config.json`` = a ``BlipConfig``,
``model.safetensors``, the tokenizer files), made once from the official ``ImageReward.pt`` with
``python -m dpok.rewards.convert image-reward``. The ``image-reward`` pip package is deliberately
not used: it loads the official checkpoint with pickle (``torch.load``), which this library never
does, and it pins old transformers / timm versions.

What is verified, and what is not:

- verified by tests (tiny random configs): the scoring path equals transformers'
  ``BlipForImageTextRetrieval`` ITM path followed by the head and the standardisation; the key
  converter maps every key of an official-layout state dict (built by inverting the mapping) onto
  :class:`ImageRewardNet` and back without loss.
- not verified here (no network, no official weights on the build machine): scores on the official
  checkpoint against the ``image-reward`` package. The official key names, layer sizes, head layout,
  mean / std and the tokenizer's special tokens are taken from the published model; the LayerNorm
  eps of the ViT (1e-6) and the exact GELU are the official ones. Small score differences from
  the package are expected from the tensor-based resize (see :mod:`dpok.rewards.preprocess`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base import RewardError
from .preprocess import ImageTransform
from .pretrained import CONVERT, PretrainedReward, ScoreHead, require_safetensors, resolve_model_dir
from .registry import register_reward

IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
"""ImageReward tokenizes prompts to 35 tokens (padded to this length, longer ones truncated)."""
WEIGHTS_FILE = "model.safetensors"


def official_blip_config() -> Any:
    """The ``BlipConfig`` of the official ImageReward: ViT-L/16 at 224 px, BERT-base with cross-attention."""
    from transformers import BlipConfig

    vision = dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
    )
    text = dict(
        vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
        bos_token_id=30522, sep_token_id=102, is_decoder=True,  # is_decoder=True makes transformers build cross-attention
    )
    return BlipConfig(vision_config=vision, text_config=text)


class ImageRewardNet(nn.Module):
    """BLIP vision encoder + BLIP text encoder with cross-attention + score head; see the module docstring.

    ``forward(pixel_values (B, 3, S, S) normalised, input_ids (B, L), attention_mask (B, L)) -> (B,)``
    standardised scores.
    """

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.config = config
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.head = ScoreHead(int(config.text_config.hidden_size))

    def features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The [CLS]-position text feature (B, D_text) after cross-attending the image tokens."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        # is_decoder=False: ImageReward's text encoder attends bidirectionally (BLIP's "multimodal" mode).
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        )
        return text.last_hidden_state[:, 0, :]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raw = self.head(self.features(pixel_values, input_ids, attention_mask).float())
        return (raw - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD


def image_reward_key(official: str) -> str | None:
    """Map a key of the official ImageReward state dict to :class:`ImageRewardNet`'s; None for unused keys.

    ``blip.visual_encoder.*`` (timm ViT names) -> ``vision_model.*``, ``blip.text_encoder.*`` (BERT
    names, as transformers' BLIP text model) -> ``text_encoder.*``, ``mlp.layers.*`` -> ``head.layers.*``.
    The contrastive projections, ITM / LM heads and buffers are not used for scoring and map to None.
    """
    if official.startswith("mlp.layers."):
        return "head." + official[len("mlp.") :]
    if official.startswith("blip.text_encoder."):
        rest = official[len("blip.text_encoder.") :]
        # BLIP's text embeddings have no token types; a token_type table (if a checkpoint carries BERT's) is unused.
        if rest.endswith("position_ids") or rest.startswith("pooler.") or "token_type_embeddings" in rest:
            return None
        return "text_encoder." + rest
    if not official.startswith("blip.visual_encoder."):
        return None
    rest = official[len("blip.visual_encoder.") :]
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    if rest in fixed:
        return "vision_model." + fixed[rest]
    if rest.startswith("blocks."):
        _, index, sub = rest.split(".", 2)
        block = {
            "norm1.": "layer_norm1.", "norm2.": "layer_norm2.", "attn.qkv.": "self_attn.qkv.",
            "attn.proj.": "self_attn.projection.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
        }
        for old, new in block.items():
            if sub.startswith(old):
                return f"vision_model.encoder.layers.{index}.{new}{sub[len(old):]}"
    return None


def convert_image_reward_state_dict(official: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official ImageReward state dict -> :class:`ImageRewardNet` state dict (same tensors, renamed).

    timm's fused qkv (q, k, v stacked on dim 0, heads inside each) is laid out exactly as
    transformers' BLIP ``qkv``, so no tensor is reshaped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in official.items():
        new = image_reward_key(key)
        if new is not None:
            out[new] = value
    return out


def write_image_reward_folder(
    folder: str | Path, config: Any, state_dict: Mapping[str, torch.Tensor], tokenizer: Any, image_size: int | None = None
) -> Path:
    """Save an ``image-reward`` folder: config.json, model.safetensors, tokenizer files, preprocessor_config.json.

    The state dict is checked against :class:`ImageRewardNet` (strict) before anything is written.
    """
    from safetensors.torch import save_file

    net = ImageRewardNet(config)
    net.load_state_dict(dict(state_dict), strict=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "dpok": "image-reward"})
    tokenizer.save_pretrained(str(folder))
    size = int(image_size or config.vision_config.image_size)
    from .preprocess import CLIP_MEAN, CLIP_STD

    processor = {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
                 "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_resize": True, "do_center_crop": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n", encoding="utf-8")
    return folder


def load_image_reward_net(reward: str, folder: Path, device: torch.device) -> ImageRewardNet:
    """Load :class:`ImageRewardNet` from a folder written by :func:`write_image_reward_folder`."""
    from safetensors.torch import load_file
    from transformers import BlipConfig

    require_safetensors(reward, folder)
    weights = folder / WEIGHTS_FILE
    if not (folder / "config.json").is_file() or not weights.is_file():
        raise RewardError(
            f"reward {reward!r}: {str(folder)!r} is not an ImageReward folder (needs config.json and {WEIGHTS_FILE}); "
            f"make one from the official ImageReward.pt with `{CONVERT} image-reward ImageReward.pt OUT_FOLDER`"
        )
    config = BlipConfig.from_pretrained(str(folder))
    net = ImageRewardNet(config)
    try:
        net.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as e:
        raise RewardError(f"reward {reward!r}: the weights in {str(folder)!r} do not fit its config.json: {e}") from e
    return net.eval().to(device)


class ImageRewardReward(PretrainedReward):
    """``image-reward``: standardised ImageReward score (B,), roughly N(0, 1); see the module docstring."""

    name = "image-reward"

    def __init__(self, model: str | Path, device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        super().__init__(device, batch_size)
        self.source = str(model)
        self.net: ImageRewardNet | None = None
        self.tokenizer: Any = None
        self.transform = ImageTransform()

    def _load(self) -> None:
        from transformers import AutoTokenizer

        folder = resolve_model_dir(
            self.name, self.source, hint=f"Make the folder from the official ImageReward.pt with `{CONVERT} image-reward`."
        )
        self.net = load_image_reward_net(self.name, folder, self.device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RewardError(f"reward {self.name!r}: cannot load the tokenizer in {str(folder)!r}: {e}") from e
        self.transform = ImageTransform.from_folder(folder, int(self.net.config.vision_config.image_size))

    def _modules(self) -> list[nn.Module]:
        return [self.net]

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        )
        return self.net(
            self.transform(images), tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        )


@register_reward(
    "image-reward",
    "ImageReward (DPOK's reward): standardised human-preference score, about N(0, 1) (option model=FOLDER, converted)",
)
def image_reward(
    model: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 16
) -> ImageRewardReward:
    """The ``image-reward`` reward; ``model`` is a folder (or hub id) in the format of :func:`write_image_reward_folder`."""
    if model is None:
        raise RewardError(
            "reward 'image-reward' needs model=FOLDER: convert the official checkpoint (THUDM/ImageReward, "
            f"ImageReward.pt) once with `{CONVERT} image-reward ImageReward.pt OUT_FOLDER` (see docs/rewards.md)"
        )
    return ImageRewardReward(model, device, batch_size)
