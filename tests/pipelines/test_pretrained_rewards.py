"""Tests of the pretrained-model rewards (clip-score, pickscore, hpsv2, aesthetic, image-reward) and converters.

Every model is a tiny random one built here (hidden size 32, 2 layers, 32 px images) and saved to
a temporary folder, so nothing is downloaded; scores are checked against hand computations with
the models' own transformers forward passes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dpok.rewards import RewardError, make_reward
from dpok.rewards.convert import (
    convert_aesthetic_head,
    convert_bin_folder,
    convert_openclip_checkpoint,
    main,
    openclip_to_hf_clip,
)
from dpok.rewards.image_reward import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    ImageRewardNet,
    convert_image_reward_state_dict,
    write_image_reward_folder,
)
from dpok.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform
from dpok.rewards.pretrained import ScoreHead

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a white circle"]
OTHER = ["a red circle", "four yellow triangles", "a green triangle left of a white circle"]


def _images(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """CLIP normalisation by hand (32 px images need no resize or crop for 32 px models)."""
    return (images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)


def _features(out: object) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with the projection as pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# --- tiny CLIP ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPModel

    from dpok.embedded.tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    tok = build_tokenizer(folder)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, hidden_act="gelu")
    text = dict(common, vocab_size=len(tok), max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    vision = dict(common, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    return folder


def _clip_cosines(folder: Path, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos (B,), exp(logit_scale)) by CLIPModel's own get_image_features / get_text_features."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        u = _features(model.get_image_features(pixel_values=_normalise(images)))
        v = _features(model.get_text_features(**tok(prompts, padding=True, return_tensors="pt")))
        return F.cosine_similarity(u, v, dim=-1), model.logit_scale.exp()


def _check_common(reward_name: str, images: torch.Tensor, **options: object) -> torch.Tensor:
    """Score PROMPTS twice; check shape, finiteness, determinism, batching; return the scores."""
    reward = make_reward(reward_name, **options)
    first = reward(images, PROMPTS)
    assert first.scores.shape == (3,) and first.scores.dtype == torch.float32
    assert bool(first.valid.all()) and bool(torch.isfinite(first.raw).all())
    assert torch.equal(reward(images, PROMPTS).raw, first.raw)
    # Scoring in batches of 2 (3 images -> 2 forward passes) gives the same scores as one pass.
    chunked = make_reward(reward_name, batch_size=2, **options)(images, PROMPTS).raw
    torch.testing.assert_close(chunked, first.raw, rtol=1e-5, atol=1e-5)
    return first.raw


def test_clip_score_matches_clip_model(clip_dir: Path) -> None:
    images = _images()
    scores = _check_common("clip-score", images, model=str(clip_dir))
    expected, _ = _clip_cosines(clip_dir, images, PROMPTS)
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=1e-5)
    other = make_reward("clip-score", model=clip_dir)(images, OTHER).raw
    assert other[0] == pytest.approx(float(scores[0]), abs=1e-6) and other[1] != pytest.approx(float(scores[1]), abs=1e-6)


def test_clip_score_resizes_other_image_sizes(clip_dir: Path) -> None:
    # 48 x 40 images are resized (shortest side 32) and center-cropped to the model's 32 x 32.
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    out = make_reward("clip-score", model=clip_dir)(images, PROMPTS)
    assert out.scores.shape == (3,) and bool(out.valid.all())
    assert bool((out.raw.abs() <= 1 + 1e-5).all())


def test_pickscore_is_scaled_cosine(clip_dir: Path) -> None:
    images = _images(2)
    scores = _check_common("pickscore", images, model=str(clip_dir))
    cos, scale = _clip_cosines(clip_dir, images, PROMPTS)
    torch.testing.assert_close(scores, (scale * cos).float(), rtol=1e-4, atol=1e-4)
    other = make_reward("pickscore", model=clip_dir)(images, OTHER).raw
    assert not torch.allclose(other[1], scores[1])
    # The tokenizer / preprocessing may come from a separate folder (the official repo has none).
    separate = make_reward("pickscore", model=clip_dir, processor=clip_dir)(images, PROMPTS).raw
    torch.testing.assert_close(separate, scores)


# --- OpenCLIP conversion and hpsv2 --------------------------------------------------------------

_BLOCK_INV = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.out_proj.": "attn.out_proj.",
              "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
_TOP_INV = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight", "text_model.final_layer_norm.bias": "ln_final.bias",
    "logit_scale": "logit_scale", "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight", "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
}


def _to_openclip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of the converter's mapping, written independently: transformers CLIP -> OpenCLIP keys."""
    out: dict[str, torch.Tensor] = {"attn_mask": torch.zeros(16, 16)}  # a buffer OpenCLIP saves; must be ignored
    for key, value in hf.items():
        if key in _TOP_INV:
            out[_TOP_INV[key]] = value.clone()
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().clone()
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().clone()
        elif key.endswith("position_ids"):
            continue
        else:
            tower, _, _, index, sub = key.split(".", 4)
            prefix = ("visual." if tower == "vision_model" else "") + f"transformer.resblocks.{index}."
            if sub.startswith("self_attn.") and sub.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                kind = sub.split(".")[2]
                name = f"{prefix}attn.in_proj_{kind}"
                if name not in out:
                    parts = [hf[f"{tower}.encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[name] = torch.cat(parts, dim=0).clone()
                continue
            old = next(k for k in _BLOCK_INV if sub.startswith(k))
            out[prefix + _BLOCK_INV[old] + sub[len(old):]] = value.clone()
    return out


@pytest.fixture(scope="module")
def hps_dir(clip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPModel

    state = CLIPModel.from_pretrained(clip_dir).state_dict()
    path = tmp_path_factory.mktemp("hps") / "openclip.pt"
    # The official file wraps the weights as {"state_dict": {"module.<key>": tensor}}.
    torch.save({"state_dict": {"module." + k: v for k, v in _to_openclip(state).items()}}, path)
    return convert_openclip_checkpoint(path, path.parent / "hf", tokenizer=clip_dir, vision_heads=2, text_heads=2)


def test_openclip_conversion_round_trips(clip_dir: Path, hps_dir: Path) -> None:
    from transformers import CLIPModel

    original = CLIPModel.from_pretrained(clip_dir).state_dict()
    converted, config = openclip_to_hf_clip(_to_openclip(original), vision_heads=2, text_heads=2)
    persistent = {k for k in original if not k.endswith("position_ids")}
    assert set(converted) == persistent
    for key in persistent:
        assert torch.equal(converted[key], original[key]), key
    assert config.vision_config.image_size == 32 and config.vision_config.patch_size == 8
    assert config.text_config.num_hidden_layers == 2 and config.projection_dim == 16
    reloaded = CLIPModel.from_pretrained(hps_dir).state_dict()
    assert all(torch.equal(reloaded[k], original[k]) for k in persistent)
    assert any(hps_dir.glob("*.safetensors")) and not any(hps_dir.glob("*.bin"))
    with pytest.raises(ValueError, match="unknown keys"):
        openclip_to_hf_clip({**_to_openclip(original), "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(32)})


def test_hpsv2_is_cosine_of_converted_model(clip_dir: Path, hps_dir: Path) -> None:
    images = _images(3)
    scores = _check_common("hpsv2", images, model=str(hps_dir))
    expected, _ = _clip_cosines(clip_dir, images, PROMPTS)
    torch.testing.assert_close(scores, expected.float(), rtol=1e-4, atol=1e-5)
    other = make_reward("hpsv2", model=hps_dir)(images, OTHER).raw
    assert not torch.allclose(other[1], scores[1])
    with pytest.raises(RewardError, match="hpsv2.*model=FOLDER"):
        make_reward("hpsv2")


# --- aesthetic ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def head_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(1)
    torch.save(ScoreHead(16).state_dict(), folder / "head.pth")  # the official file is a plain state dict
    assert main(["aesthetic-head", str(folder / "head.pth"), str(folder / "head.safetensors")]) == 0
    return folder / "head.safetensors"


def test_aesthetic_is_head_of_normalised_embedding(clip_dir: Path, head_file: Path) -> None:
    from safetensors.torch import load_file
    from transformers import CLIPModel

    images = _images(4)
    scores = _check_common("aesthetic", images, model=str(clip_dir), head=str(head_file))
    head = ScoreHead(16).eval()
    head.load_state_dict(load_file(head_file))
    with torch.no_grad():
        u = _features(CLIPModel.from_pretrained(clip_dir).eval().get_image_features(pixel_values=_normalise(images)))
        expected = head(F.normalize(u, dim=-1))
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)
    # The aesthetic score ignores the prompt but not the image.
    reward = make_reward("aesthetic", model=clip_dir, head=head_file)
    assert torch.equal(reward(images, OTHER).raw, scores)
    assert not torch.allclose(reward(_images(5), PROMPTS).raw, scores)


def test_aesthetic_head_errors(clip_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RewardError, match="aesthetic.*head="):
        make_reward("aesthetic", model=clip_dir)
    missing = tmp_path / "nohead.safetensors"
    with pytest.raises(RewardError, match=f"aesthetic.*{missing.name}"):
        make_reward("aesthetic", model=clip_dir, head=missing)(_images(), PROMPTS)
    with pytest.raises(ValueError, match="missing"):
        convert_aesthetic_head({"layers.0.weight": torch.zeros(2, 2)}, tmp_path / "bad.safetensors")


# --- image-reward -------------------------------------------------------------------------------

_VISION_INV = {
    "embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias",
}
_VIT_BLOCK_INV = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "self_attn.qkv.": "attn.qkv.",
                  "self_attn.projection.": "attn.proj.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}


def _to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ImageRewardNet keys -> the official checkpoint's (BLIP + timm ViT + mlp), plus keys scoring must ignore."""
    out = {"blip.vision_proj.weight": torch.zeros(4, 32), "blip.text_encoder.embeddings.position_ids": torch.arange(40)}
    for key, value in state.items():
        if key.startswith("head."):
            out["mlp." + key[len("head."):]] = value
        elif key.startswith("text_encoder."):
            out["blip." + key] = value
        else:
            rest = key[len("vision_model."):]
            if rest in _VISION_INV:
                out["blip.visual_encoder." + _VISION_INV[rest]] = value
            else:
                _, _, index, sub = rest.split(".", 3)
                old = next(k for k in _VIT_BLOCK_INV if sub.startswith(k))
                out[f"blip.visual_encoder.blocks.{index}.{_VIT_BLOCK_INV[old]}{sub[len(old):]}"] = value
    return out


@pytest.fixture(scope="module")
def image_reward_parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ImageRewardNet]:
    from transformers import BertTokenizer, BlipConfig

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"a an of left two four red blue green white yellow".split(),
             *"circle circles square squares triangle triangles".split()]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # as BLIP does
    config = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6, initializer_range=0.02),
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=40, pad_token_id=0,
                         bos_token_id=tok.bos_token_id, is_decoder=True),
    )
    torch.manual_seed(2)
    net = ImageRewardNet(config).eval()
    official = _to_official(net.state_dict())
    converted = convert_image_reward_state_dict(official)
    assert set(converted) == set(net.state_dict())
    assert all(torch.equal(converted[k], v) for k, v in net.state_dict().items())
    folder = write_image_reward_folder(tmp_path_factory.mktemp("image-reward"), config, converted, tok)
    return folder, net


def test_image_reward_matches_blip_itm_path(image_reward_parts: tuple[Path, ImageRewardNet]) -> None:
    from transformers import AutoTokenizer, BlipConfig, BlipForImageTextRetrieval

    folder, net = image_reward_parts
    saved = BlipConfig.from_pretrained(folder)
    assert saved.vision_config.layer_norm_eps == 1e-6 and saved.text_config.encoder_hidden_size == 32
    images = _images(6)
    scores = _check_common("image-reward", images, model=str(folder))
    # Reference: transformers' own ITM forward with the same encoders; the [CLS] feature it feeds
    # to itm_head goes through the head and the standardisation.
    itm = BlipForImageTextRetrieval(net.config).eval()
    itm.vision_model.load_state_dict(net.vision_model.state_dict())
    itm.text_encoder.load_state_dict(net.text_encoder.state_dict())
    seen: list[torch.Tensor] = []
    itm.itm_head.register_forward_hook(lambda module, args, output: seen.append(args[0]))
    tokens = AutoTokenizer.from_pretrained(folder)(PROMPTS, padding="max_length", max_length=35, return_tensors="pt")
    with torch.no_grad():
        itm(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=_normalise(images))
        expected = (net.head(seen[0]) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    other = make_reward("image-reward", model=folder)(images, OTHER).raw
    assert other[0] == pytest.approx(float(scores[0]), abs=1e-5) and abs(float(other[1] - scores[1])) > 1e-6
    with pytest.raises(RewardError, match="image-reward.*model=FOLDER"):
        make_reward("image-reward")


# --- loading errors and misc --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip-score", "pickscore", "hpsv2", "aesthetic", "image-reward"])
def test_uncached_hub_id_offline_names_reward_and_id(
    name: str, head_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "dpok-tests/not-a-cached-model"
    options = {"head": head_file} if name == "aesthetic" else {}
    reward = make_reward(name, model=hub_id, **options)  # building is cheap: nothing loads yet
    with pytest.raises(RewardError, match=rf"{name}.*{hub_id}.*model=FOLDER"):
        reward(_images(), PROMPTS)


def test_missing_local_folder_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    with pytest.raises(RewardError, match=rf"clip-score.*{missing.name}.*does not exist"):
        make_reward("clip-score", model=missing)(_images(), PROMPTS)
    with pytest.raises(RewardError, match=rf"image-reward.*{missing.name}"):
        make_reward("image-reward", model=missing)(_images(), PROMPTS)


def test_pickle_only_folder_is_refused_then_converted(clip_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, CLIPModel

    # A folder as older hub repos have it: config, tokenizer and a pickled pytorch_model.bin.
    bin_dir = tmp_path / "bin"
    model = CLIPModel.from_pretrained(clip_dir)
    model.config.save_pretrained(bin_dir)
    AutoTokenizer.from_pretrained(clip_dir).save_pretrained(bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    with pytest.raises(RewardError, match="no safetensors.*convert"):
        make_reward("clip-score", model=bin_dir)(_images(), PROMPTS)
    out = convert_bin_folder(bin_dir, tmp_path / "st")
    expected = make_reward("clip-score", model=clip_dir)(_images(), PROMPTS).raw
    torch.testing.assert_close(make_reward("clip-score", model=out)(_images(), PROMPTS).raw, expected)


def test_image_transform_reads_processor_config(tmp_path: Path) -> None:
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 24}, "crop_size": {"height": 20, "width": 20}, "image_mean": [0.5, 0.5, 0.5],
         "image_std": [0.25, 0.25, 0.25]}))
    transform = ImageTransform.from_folder(tmp_path, image_size=32)
    assert (transform.size, transform.crop, transform.mean) == (24, 20, (0.5, 0.5, 0.5))
    out = transform(torch.full((2, 3, 48, 64), 0.75))
    assert out.shape == (2, 3, 20, 20)
    torch.testing.assert_close(out, torch.full_like(out, 1.0))  # (0.75 - 0.5) / 0.25; a constant image stays constant
    assert ImageTransform.from_folder(tmp_path / "none", image_size=32).crop == 32


def test_training_and_eval_settings_reach_the_reward(clip_dir: Path, head_file: Path) -> None:
    """--reward-model / --reward-head become the reward's ``model`` / ``head`` options, and an option
    no part of the spec takes is an error, not silently ignored."""
    from dpok.config import build_config
    from dpok.rewards import RewardError

    cfg = build_config(None, {"model": str(clip_dir), "reward": "aesthetic", "reward_model": str(clip_dir),
                              "reward_head": str(head_file), "prompt": ["a red circle"]})
    reward = cfg.reward.build(torch.device("cpu"))
    expected = make_reward("aesthetic", model=str(clip_dir), head=str(head_file))(_images(), ["x"] * 3).scores
    torch.testing.assert_close(reward(_images(), ["x"] * 3).scores, expected)
    cfg = build_config(None, {"model": str(clip_dir), "reward": "jpeg-compressibility", "reward_head": str(head_file),
                              "prompt": ["a red circle"]})
    with pytest.raises(RewardError, match="head"):
        cfg.reward.build(torch.device("cpu"))
