"""One-off conversions of official reward checkpoints to the safetensors folders the rewards load.

The library itself never unpickles anything. The official ImageReward, HPS v2 and LAION
aesthetic checkpoints are pickles, so this module is the explicit user step that reads them (with
``torch.load(..., weights_only=True)``, which refuses arbitrary objects) and writes safetensors
plus JSON. Run it on any machine that has the checkpoint::

    python -m dpok.rewards.convert hpsv2 HPS_v2.1_compressed.pt OUT_FOLDER [--tokenizer ID_OR_FOLDER]
    python -m dpok.rewards.convert image-reward ImageReward.pt OUT_FOLDER [--tokenizer ID_OR_FOLDER]
    python -m dpok.rewards.convert aesthetic-head sac+logos+ava1-l14-linearMSE.pth OUT.safetensors
    python -m dpok.rewards.convert safetensors HF_FOLDER_WITH_BIN OUT_FOLDER

``--tokenizer`` is read with transformers (a hub id needs the internet, or give a folder).

OpenCLIP -> transformers CLIP naming (:func:`openclip_to_hf_clip`), per residual block
``transformer.resblocks.{i}`` -> ``encoder.layers.{i}`` with ``ln_1/ln_2`` -> ``layer_norm1/2``,
``attn.in_proj_{weight,bias}`` split in three -> ``self_attn.{q,k,v}_proj``, ``attn.out_proj`` ->
``self_attn.out_proj``, ``mlp.c_fc/c_proj`` -> ``mlp.fc1/fc2``; the text tower's keys sit at the top
level and go under ``text_model.``, the image tower's under ``visual.`` go to ``vision_model.``;
``text_projection`` and ``visual.proj`` are (in, out) matrices and become the transposed weights of
``text_projection`` / ``visual_projection``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .preprocess import CLIP_MEAN, CLIP_STD
from .pretrained import HEAD_KEYS

HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
BERT_TOKENIZER = "google-bert/bert-base-uncased"

_BLOCK_MAP = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "attn.out_proj.": "self_attn.out_proj.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
}
_TOP_MAP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}
_IGNORED = {"attn_mask"}  # the text tower's causal mask buffer: transformers builds it itself


def load_pickle_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors with ``torch.load(weights_only=True)``; unwraps ``state_dict`` and ``module.``."""
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(obj).__name__}")
    # DataParallel / DDP training saves every key with a "module." prefix (HPS v2 does).
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _tower_block(key: str, prefix: str, target: str) -> list[tuple[str, int | None]] | None:
    """Targets of a residual-block key ``{prefix}{i}.{sub}``: [(name, part)], part the q/k/v index (0-2) of a fused in_proj."""
    if not key.startswith(prefix):
        return None
    index, sub = key[len(prefix) :].split(".", 1)
    base = f"{target}.encoder.layers.{index}."
    for old, new in _BLOCK_MAP.items():
        if sub.startswith(old):
            return [(base + new + sub[len(old) :], None)]
    if sub in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = "weight" if sub.endswith("weight") else "bias"
        return [(f"{base}self_attn.{n}_proj.{kind}", i) for i, n in enumerate("qkv")]
    return None


def openclip_to_hf_clip(
    state: Mapping[str, torch.Tensor],
    vision_heads: int = 16,
    text_heads: int = 16,
    hidden_act: str = "gelu",
    bos_token_id: int = 49406,
    eos_token_id: int = 49407,
) -> tuple[dict[str, torch.Tensor], Any]:
    """OpenCLIP (ViT image tower, standard text tower) state dict -> (transformers CLIPModel state dict, CLIPConfig).

    Sizes (widths, depths, MLP width, patch size, image size, context length, vocabulary,
    projection) are read off the tensors; the head counts are not in a state dict and are given
    (ViT-H-14, the HPS v2 backbone: 16 and 16). ``hidden_act`` is "gelu" for LAION-trained OpenCLIP
    models and "quick_gelu" for OpenAI's. Unknown keys raise ValueError rather than being dropped.
    """
    from transformers import CLIPConfig

    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key in _IGNORED:
            continue
        if key in _TOP_MAP:
            out[_TOP_MAP[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        targets = _tower_block(key, "visual.transformer.resblocks.", "vision_model")
        if targets is None:
            targets = _tower_block(key, "transformer.resblocks.", "text_model")
        if targets is None:
            unknown.append(key)
            continue
        for name, part in targets:
            # in_proj stacks q, k, v along dim 0: rows [0, W) are q, [W, 2W) k, [2W, 3W) v.
            out[name] = value if part is None else value.chunk(3, dim=0)[part].contiguous()
    if unknown:
        raise ValueError(f"not an OpenCLIP ViT state dict; unknown keys: {', '.join(sorted(unknown)[:10])}")

    def depth(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)})

    tok = state["token_embedding.weight"]
    pos_v = state["visual.positional_embedding"]
    patch = int(state["visual.conv1.weight"].shape[-1])
    grid = math.isqrt(int(pos_v.shape[0]) - 1)
    text_cfg = dict(
        vocab_size=int(tok.shape[0]), hidden_size=int(tok.shape[1]),
        intermediate_size=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=depth("transformer.resblocks."), num_attention_heads=int(text_heads),
        max_position_embeddings=int(state["positional_embedding"].shape[0]), hidden_act=hidden_act,
        bos_token_id=int(bos_token_id), eos_token_id=int(eos_token_id), pad_token_id=int(eos_token_id),
    )
    vision_cfg = dict(
        hidden_size=int(pos_v.shape[1]),
        intermediate_size=int(state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=depth("visual.transformer.resblocks."), num_attention_heads=int(vision_heads),
        image_size=grid * patch, patch_size=patch, hidden_act=hidden_act,
    )
    config = CLIPConfig(
        text_config=text_cfg, vision_config=vision_cfg, projection_dim=int(state["text_projection"].shape[1])
    )
    return out, config


def _processor_config(size: int) -> dict[str, Any]:
    return {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}, "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "do_resize": True, "do_center_crop": True}


def convert_openclip_checkpoint(
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    out: str | Path,
    tokenizer: str | Path = HPS_TOKENIZER,
    vision_heads: int = 16,
    text_heads: int = 16,
    hidden_act: str = "gelu",
) -> Path:
    """OpenCLIP checkpoint (file or state dict) -> transformers CLIP folder (safetensors, config, tokenizer).

    The result is what ``hpsv2`` (or ``clip-score``) takes as ``model=``.
    """
    from transformers import AutoTokenizer, CLIPModel

    state = load_pickle_state_dict(checkpoint) if isinstance(checkpoint, str | Path) else dict(checkpoint)
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    hf_state, config = openclip_to_hf_clip(
        state, vision_heads, text_heads, hidden_act, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id
    )
    model = CLIPModel(config)
    model.load_state_dict(hf_state, strict=True)
    folder = Path(out)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    size = int(config.vision_config.image_size)
    (folder / "preprocessor_config.json").write_text(json.dumps(_processor_config(size), indent=2) + "\n", encoding="utf-8")
    return folder


def convert_aesthetic_head(checkpoint: str | Path | Mapping[str, torch.Tensor], out: str | Path) -> Path:
    """LAION improved-aesthetic-predictor weights (.pth or state dict) -> a safetensors file for ``head=``."""
    from safetensors.torch import save_file

    state = load_pickle_state_dict(checkpoint) if isinstance(checkpoint, str | Path) else dict(checkpoint)
    missing = [k for k in HEAD_KEYS if k not in state]
    if missing:
        raise ValueError(f"not an aesthetic predictor state dict: missing {', '.join(missing)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: state[k].detach().float().contiguous() for k in HEAD_KEYS}, str(out), metadata={"format": "pt"})
    return out


def convert_image_reward(
    checkpoint: str | Path | Mapping[str, torch.Tensor], out: str | Path, tokenizer: str | Path = BERT_TOKENIZER
) -> Path:
    """Official ImageReward.pt (or its state dict) -> the folder ``image-reward`` takes as ``model=``.

    The tokenizer is BERT-base-uncased plus BLIP's two extra tokens ([DEC] as bos, [ENC]), which
    makes the vocabulary 30524 as in the checkpoint.
    """
    from transformers import AutoTokenizer

    from .image_reward import convert_image_reward_state_dict, official_blip_config, write_image_reward_folder

    state = load_pickle_state_dict(checkpoint) if isinstance(checkpoint, str | Path) else dict(checkpoint)
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return write_image_reward_folder(out, official_blip_config(), convert_image_reward_state_dict(state), tok)


def convert_bin_folder(src: str | Path, out: str | Path) -> Path:
    """A transformers folder with ``pytorch_model*.bin`` -> a copy with one ``model.safetensors`` instead."""
    from safetensors.torch import save_file

    src, folder = Path(src), Path(out)
    bins = sorted(src.glob("pytorch_model*.bin"))
    if not bins:
        raise ValueError(f"{src}: no pytorch_model*.bin to convert")
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for path in bins:
        tensors.update(load_pickle_state_dict(path))
    # Tied weights share storage, which safetensors refuses; each key gets its own copy.
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    for path in src.iterdir():
        if path.is_file() and path.suffix in {".json", ".txt", ".model"} and not path.name.endswith(".bin.index.json"):
            shutil.copy2(path, folder / path.name)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dpok.rewards.convert KIND IN OUT [...]``; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m dpok.rewards.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    for kind, helptext in (("hpsv2", "HPS v2 / v2.1 OpenCLIP checkpoint"), ("openclip", "any OpenCLIP ViT checkpoint")):
        p = sub.add_parser(kind, help=f"{helptext} -> transformers CLIP folder")
        p.add_argument("checkpoint")
        p.add_argument("out")
        p.add_argument("--tokenizer", default=HPS_TOKENIZER, help="hub id or folder of the CLIP tokenizer")
        p.add_argument("--vision-heads", type=int, default=16)
        p.add_argument("--text-heads", type=int, default=16)
        p.add_argument("--act", default="gelu", choices=["gelu", "quick_gelu"], help="quick_gelu for OpenAI weights")
    p = sub.add_parser("image-reward", help="official ImageReward.pt -> image-reward folder")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--tokenizer", default=BERT_TOKENIZER, help="hub id or folder of bert-base-uncased")
    p = sub.add_parser("aesthetic-head", help="LAION aesthetic predictor .pth -> head .safetensors")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p = sub.add_parser("safetensors", help="transformers folder with pytorch_model.bin -> folder with model.safetensors")
    p.add_argument("checkpoint")
    p.add_argument("out")
    args = parser.parse_args(argv)
    if args.kind in ("hpsv2", "openclip"):
        done = convert_openclip_checkpoint(args.checkpoint, args.out, args.tokenizer, args.vision_heads,
                                           args.text_heads, args.act)
    elif args.kind == "image-reward":
        done = convert_image_reward(args.checkpoint, args.out, args.tokenizer)
    elif args.kind == "aesthetic-head":
        done = convert_aesthetic_head(args.checkpoint, args.out)
    else:
        done = convert_bin_folder(args.checkpoint, args.out)
    print(f"wrote {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
