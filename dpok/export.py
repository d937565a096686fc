"""A run's LoRA for other tools: the kohya format of ComfyUI and AUTOMATIC1111, and a model card.

``lora/pytorch_lora_weights.safetensors`` (peft naming, what diffusers' ``load_lora_weights``
reads) is converted with diffusers' own :func:`~diffusers.utils.state_dict_utils.convert_state_dict_to_kohya`
into ``lora_unet_…`` keys (``lora_down`` / ``lora_up`` weights and one ``.alpha`` per module);
the converter sets every alpha to the rank, so the LoRA's real alpha, read from the adapter
metadata diffusers stores in the file, is written instead (scale = alpha / rank is what makes the
images the same). ComfyUI, A1111 and diffusers itself read these keys.

``lora/README.md`` is a model card in the format the Hugging Face Hub reads (YAML metadata via
``huggingface_hub.ModelCardData``, then Markdown): base model, algorithm, reward, prompts, budget,
before/after rewards and the sample grids, copied beside it, so the folder uploads as it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .adapter import peft_to_kohya
from .assets import EMBEDDED_MODELS
from .runlog import read_metrics

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"  # not *pytorch_lora_weights.safetensors: diffusers' folder loading ignores it
CARD_FILE = "README.md"


class ExportError(ValueError):
    """A LoRA folder or run that cannot be exported; the message says what is missing."""


def lora_folder(path: str | Path) -> Path:
    """The LoRA folder of a run folder (``RUN/lora``), or ``path`` itself if it holds the weights."""
    path = Path(path)
    for folder in (path, path / "lora"):
        if (folder / LORA_FILE).is_file():
            return folder
    raise ExportError(f"{path} holds no {LORA_FILE} (nor lora/{LORA_FILE}); give a run folder of 'dpok train' "
                      "with --finetune lora, or its lora/ folder")


def read_lora(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights of ``folder``'s LoRA file and its UNet adapter settings (``r``, ``lora_alpha``, ...)."""
    from safetensors import safe_open

    path = Path(folder) / LORA_FILE
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    raw = json.loads(meta.get("lora_adapter_metadata", "{}"))
    config = {k.removeprefix("unet."): v for k, v in raw.items() if k.startswith("unet.")}
    if "lora_alpha" not in config or "r" not in config:
        raise ExportError(f"{path} carries no LoRA adapter metadata (rank, alpha); it was not written by "
                          "'dpok train' or diffusers' save_lora_weights with adapter metadata")
    return weights, config


def to_kohya(weights: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """UNet LoRA weights in peft naming (``unet.….lora_A.weight``) -> kohya's (``lora_unet_….lora_down.weight``
    with ``….alpha``), through diffusers' converter; ``.alpha`` is the adapter's ``lora_alpha``."""
    unsupported = [name for name in ("rank_pattern", "alpha_pattern") if config.get(name)]
    unsupported += [name for name in ("use_dora", "use_rslora") if config.get(name)]
    if unsupported:
        raise ExportError(f"the kohya export supports one rank and alpha for every module; this LoRA uses "
                          f"{', '.join(unsupported)}")
    other = sorted({k.split(".", 1)[0] for k in weights if not k.startswith("unet.")})
    if other:
        raise ExportError(f"only UNet LoRA weights can be exported; the file also holds {', '.join(other)}")
    kohya = peft_to_kohya({k: v.float().contiguous() for k, v in weights.items()})
    alpha = torch.tensor(float(config["lora_alpha"]))
    return {k: alpha.clone() if k.endswith(".alpha") else v.contiguous() for k, v in kohya.items()}


def export_kohya(path: str | Path, output: str | Path | None = None) -> Path:
    """Write the kohya-format LoRA of a run (or LoRA folder) ``path``; returns the file written
    (default: ``lora/lora_kohya.safetensors``)."""
    from safetensors.torch import save_file

    folder = lora_folder(path)
    weights, config = read_lora(folder)
    kohya = to_kohya(weights, config)
    out = Path(output) if output else folder / KOHYA_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(int(config["r"])),
                "ss_network_alpha": str(float(config["lora_alpha"])), "modelspec.architecture": "lora",
                "dpok_lora_targets": ",".join(sorted(config.get("target_modules") or []))}
    save_file(kohya, str(out), metadata=metadata)
    return out


# ---------------------------------------------------------------------------------- model card

def _hub_id(model: str) -> str | None:
    """``model`` if it reads as a Hub repository id (``org/name``, not a local folder), else None."""
    if model in EMBEDDED_MODELS or Path(model).expanduser().exists() or model.startswith((".", "/", "~")):
        return None
    return model if model.count("/") == 1 else None


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def model_card(cfg: dict[str, Any], summary: dict[str, Any], images: list[str], eval_rows: dict[str, Any]) -> str:
    """The model card text (YAML metadata + Markdown) of a run from its settings and summary."""
    from huggingface_hub import ModelCard, ModelCardData


    base = cfg.get("model", "shapeworld")
    prompts = list(cfg.get("prompt") or []) or list((summary.get("reward_after") or {}).keys())
    data = ModelCardData(
        base_model=_hub_id(base), library_name="diffusers", pipeline_tag="text-to-image", license=None,
        tags=["text-to-image", "diffusers", "lora", "dpok", "reinforcement-learning", cfg.get("algorithm", "dpok")],
        widget=[{"text": prompts[0], "output": {"url": images[-1]}}] if prompts and images else None,
    )
    before, after = summary.get("reward_before") or {}, summary.get("reward_after") or {}
    rows = [f"| {p} | {_fmt(before.get(p))} | {_fmt(after.get(p))} |" for p in after]
    rows.append(f"| **mean** | {_fmt(summary.get('reward_before_mean'))} | {_fmt(summary.get('reward_after_mean'))} |")
    shown_base = f"{EMBEDDED_MODELS[base]} of dpok (`--model {base}`)" if base in EMBEDDED_MODELS else f"`{base}`"
    listed = "\n".join(f"- {p}" for p in prompts[:20]) + (f"\n- … ({len(prompts) - 20} more)" if len(prompts) > 20 else "")
    if cfg.get("prompt_file"):
        listed = listed or f"- from the prompt file `{Path(cfg['prompt_file']).name}`"
    if cfg.get("prompt_set"):
        listed = listed or f"- the named prompt set `{cfg['prompt_set']}`"
    evals = ""
    if eval_rows:
        keys = [k for k in eval_rows if k.startswith("eval/")]
        evals = (f"\n### In-training evaluation after round {eval_rows.get('round')} (fixed prompts and noise)\n\n"
                 "| measure | value |\n| --- | --- |\n"
                 + "\n".join(f"| `{k}` | {_fmt(eval_rows[k])} |" for k in keys) + "\n")
    ema_note = "this LoRA"
    if cfg.get("ema_decay"):
        ema_note = (f"the LoRA's exponential moving average (decay {cfg['ema_decay']}, in `../lora_ema/`; this "
                    "folder holds the raw weights)")
    grids = "\n".join(f"![{Path(i).stem.replace('_', ' ')}]({i})" for i in images)
    body = f"""
# {cfg.get('algorithm', 'dpok').upper()} LoRA: {cfg.get('reward', '')}

A LoRA for {shown_base}, fine-tuned with reinforcement learning by dpok {__version__}
(algorithm `{cfg.get('algorithm')}`, reward `{cfg.get('reward')}`).

## Training

- base model: {shown_base}
- algorithm: `{cfg.get('algorithm')}` (learning rate {cfg.get('learning_rate')}, beta {cfg.get('beta')}, seed {cfg.get('seed')})
- reward: `{cfg.get('reward')}`
- budget: {summary.get('rounds')} rounds x {cfg.get('samples_per_round')} samples = {summary.get('reward_queries')} reward queries
- sampling: {cfg.get('num_steps')} DDIM steps, eta {cfg.get('eta')}, guidance {cfg.get('guidance_scale')}
- LoRA: rank {cfg.get('lora_rank')}, alpha {cfg.get('lora_alpha')}, on `{cfg.get('lora_targets')}`

Prompts:

{listed}

## Results

Mean reward over {summary.get('eval_images_per_prompt')} fixed-seed images per prompt, base model
and {ema_note}:

| prompt | before | after |
| --- | --- | --- |
{chr(10).join(rows)}
{evals}
{grids}

## Use

With diffusers:

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(BASE_MODEL)
pipe.load_lora_weights("path/to/this/folder")  # reads {LORA_FILE}
```

With ComfyUI or AUTOMATIC1111: copy `{KOHYA_FILE}` (kohya format) into `models/loras`
(ComfyUI) or `models/Lora` (A1111).

The run's settings are in `config.yaml` (or `config.toml`): `dpok train --config config.yaml` trains it again.
"""
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def write_model_card(run_dir: str | Path) -> Path:
    """Write ``RUN/lora/README.md`` from the run's ``config.json`` and ``summary.json``, with the sample
    grids and the config file copied beside it; returns the card's path."""

    run = Path(run_dir)
    folder = lora_folder(run)
    if folder == run:
        raise ExportError(f"{run} is a LoRA folder; the model card needs the run folder around it (config.json, "
                          "summary.json)")
    missing = [name for name in ("config.json", "summary.json") if not (run / name).is_file()]
    if missing:
        raise ExportError(f"{run} has no {', '.join(missing)}: give the folder of a finished 'dpok train' run")
    cfg = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    images = []
    for name in ("samples_before.png", "samples_after.png"):
        if (run / name).is_file():
            shutil.copyfile(run / name, folder / name)
            images.append(name)
    for name in ("config.yaml", "config.toml"):
        if (run / name).is_file():
            shutil.copyfile(run / name, folder / name)
    evals = read_metrics(run / "eval.jsonl")  # --eval-every's evaluations, if any
    card = folder / CARD_FILE
    card.write_text(model_card(cfg, summary, images, evals[-1] if evals else {}), encoding="utf-8")
    return card
