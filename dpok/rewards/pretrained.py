"""Shared machinery of the rewards backed by pretrained networks (CLIP, BLIP, score heads).

- :func:`resolve_model_dir`: a ``model`` option (a local folder or a Hugging Face hub id) -> a
  local folder, or a :class:`RewardError` that names the reward, the source and what to do.
- :class:`PretrainedReward`: lazy loading on first use, batched scoring on the reward's device.
- :class:`ScoreHead`: the 5-linear-layer MLP of the LAION aesthetic predictor and ImageReward.

Weights are read from safetensors and configs from JSON only, never from pickle files; the
one-off conversions of the official pickle checkpoints live in :mod:`dpok.rewards.convert`.
Heavy libraries (transformers, huggingface_hub) are imported inside functions so that importing
:mod:`dpok.rewards` stays fast.
"""

from __future__ import annotations

import abc
import os
import re
from pathlib import Path

import torch
from torch import nn

from .base import Reward, RewardError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
"""Files fetched from the hub for a model: configs, safetensors weights and tokenizer files (never pickles)."""
PROCESSOR_PATTERNS = ["*.json", "*.txt", "*.model"]
"""Files fetched from the hub for a tokenizer / preprocessor only (no weights)."""
_IGNORE_PATTERNS = ["open_clip*"]  # OpenCLIP-format duplicates of the weights in LAION repos; transformers cannot read them
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
CONVERT = "python -m dpok.rewards.convert"


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set now (read at call time, unlike huggingface_hub's import-time constant)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return True
    return bool(constants.HF_HUB_OFFLINE)


def resolve_model_dir(
    reward: str, source: str | Path, option: str = "model", hint: str = "", patterns: list[str] | None = None
) -> Path:
    """The local folder of ``source``: itself if it is a folder, else the hub snapshot of the id ``source``.

    Hub downloads fetch only ``patterns`` (default :data:`WEIGHT_PATTERNS`); offline (HF_HUB_OFFLINE=1)
    only the local hub cache is used. Any failure is a :class:`RewardError` naming ``reward``,
    ``source`` and how to make the weights available (plus ``hint``).
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise RewardError(f"reward {reward!r}: {option}={text!r} is a file; give the folder that holds the model")
    if not _HUB_ID_RE.match(text):
        raise RewardError(
            f"reward {reward!r}: the folder {text!r} given as {option}= does not exist; give the folder that holds "
            f"the model (config.json, *.safetensors, tokenizer files) or a Hugging Face hub id. {hint}".strip()
        )
    offline = hub_offline()
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            text, allow_patterns=patterns or WEIGHT_PATTERNS, ignore_patterns=_IGNORE_PATTERNS, local_files_only=offline
        )
    except Exception as e:  # hub errors have many types (offline, 404, auth, network); all mean "not available"
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        where = "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" if offline else reason
        raise RewardError(
            f"reward {reward!r}: {text!r} is neither a local folder nor an available Hugging Face hub model ({where}). "
            f"On a machine with internet run `hf download {text} --include '*.json' '*.safetensors' '*.txt' "
            f"--local-dir FOLDER` (huggingface_hub's CLI), "
            f"copy FOLDER here and pass {option}=FOLDER. {hint}".strip()
        ) from e
    return Path(folder)


def require_safetensors(reward: str, folder: Path) -> None:
    """Raise, saying how to convert, if ``folder`` has no ``*.safetensors`` weights (e.g. only a pickled .bin)."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    found = f" (it has {', '.join(pickles)}, pickle files this library does not load)" if pickles else ""
    raise RewardError(
        f"reward {reward!r}: no safetensors weights in {str(folder)!r}{found}. If the model exists only as "
        f"pytorch_model.bin, get the whole folder (e.g. `hf download ID --local-dir FOLDER`), convert it once with "
        f"`{CONVERT} safetensors FOLDER OUT_FOLDER` and pass model=OUT_FOLDER"
    )


class ScoreHead(nn.Module):
    """Linear(d, 1024)-Dropout-Linear(1024, 128)-Dropout-Linear(128, 64)-Dropout-Linear(64, 16)-Linear(16, 1).

    The layout of the LAION "improved aesthetic predictor" and of ImageReward's head; state-dict
    keys ``layers.{0,2,4,6,7}.{weight,bias}``. Maps features (B, d) to scores (B,). No activations:
    the official heads are a composition of linear maps (dropout only acts in training).
    """

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)[:, 0]


HEAD_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


def head_from_state_dict(reward: str, state: dict[str, torch.Tensor], source: str) -> ScoreHead:
    """A :class:`ScoreHead` with the weights of ``state`` (keys :data:`HEAD_KEYS`); RewardError if they do not fit."""
    missing = [k for k in HEAD_KEYS if k not in state]
    if missing:
        raise RewardError(f"reward {reward!r}: {source} is not a score head: missing {', '.join(missing)}")
    head = ScoreHead(int(state["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict({k: state[k] for k in HEAD_KEYS})
    except RuntimeError as e:
        raise RewardError(f"reward {reward!r}: the score head in {source} has the wrong shapes: {e}") from e
    return head.eval()


def load_head(reward: str, path: str | Path) -> ScoreHead:
    """Read a :class:`ScoreHead` from a safetensors file; RewardError naming the file if it is missing or wrong."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise RewardError(
            f"reward {reward!r}: head file {str(path)!r} does not exist; convert the official .pth once with "
            f"`{CONVERT} aesthetic-head IN.pth OUT.safetensors` and pass head=OUT.safetensors"
        )
    if file.suffix != ".safetensors":
        raise RewardError(
            f"reward {reward!r}: head {str(path)!r} is not a .safetensors file; convert it with "
            f"`{CONVERT} aesthetic-head {path} OUT.safetensors`"
        )
    from safetensors.torch import load_file

    return head_from_state_dict(reward, load_file(str(file)), repr(str(path)))


class PretrainedReward(Reward):
    """A reward whose networks load on first use and score in batches on ``device``.

    Subclasses implement ``_load`` (fill their modules) and ``_score(images, prompts)`` for one
    batch of at most ``batch_size`` images already on the device, returning (b,) float scores.
    """

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        if int(batch_size) < 1:
            raise RewardError(f"reward {self.name!r}: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self._loaded = False

    @abc.abstractmethod
    def _load(self) -> None:
        """Load the networks (on ``self.device``, eval mode)."""

    @abc.abstractmethod
    def _modules(self) -> list[nn.Module]:
        """The loaded networks, for :meth:`to`."""

    @abc.abstractmethod
    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """images float (b, 3, H, W) in [0, 1] on the device, b prompts -> (b,) scores."""

    def load(self) -> PretrainedReward:
        """Load the networks now (otherwise the first call does); returns ``self``."""
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def to(self, device: str | torch.device) -> PretrainedReward:
        self.device = torch.device(device)
        if self._loaded:
            for module in self._modules():
                module.to(self.device)
        return self

    @torch.no_grad()
    def _compute(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.load()
        parts = []
        for i in range(0, images.shape[0], self.batch_size):
            chunk = images[i : i + self.batch_size].to(self.device, torch.float32)
            parts.append(self._score(chunk, prompts[i : i + self.batch_size]).float().cpu())
        return torch.cat(parts) if parts else torch.zeros(0)
