"""``dpok pretrain --family flow-matching``: the embedded flow-matching ShapeWorld model.

A ``StableDiffusion3Pipeline`` folder on the same world as the first embedded model. The generic
parts are taken from a finished DDIM-family model folder (``--base-model``, default the shipped
``shapeworld``), as Stable Diffusion 3 reuses CLIP and an autoencoder it did not train:

- tokenizer and text encoder -> both CLIP slots (``text_encoder``/``text_encoder_2``) as
  ``CLIPTextModelWithProjection`` with an identity projection; no T5;
- VAE unchanged, with SD3's ``shift_factor`` (0: the latents are already centred);
- a new ``SD3Transformer2DModel`` (``make_sd3_transformer``) trained here with the rectified-flow
  loss (below) on the same biased caption mix as the UNet; the scheduler is
  ``FlowMatchEulerDiscreteScheduler`` without shift.

Stages (each resumable, results in ``work_dir/<stage>``): ``transformer``, ``export``, ``report``.

Rectified flow (Esser et al. 2024, the SD3 paper): x_t = (1 - t) x_0 + t eps with t = sigmoid(n),
n ~ N(m, s^2) (logit-normal, m = 0, s = 1), and the transformer, given x_t and the timestep
1000 t, regresses the velocity v = eps - x_0 (MSE).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..assets import default_flow_model_dir, default_model_dir, default_reward_dir
from ..attention import fold_text_tokens
from ..domains import write_domain_file
from ..shapeworld import parse_prompt, prompt_sets
from .alignment import AlignmentRewardModel
from .architecture import SD3_T5_TOKENS, make_flow_scheduler, make_sd3_transformer, text_encoder_with_projection
from .pretrain_config import FLOW_STAGES
from .stages import (
    DOMAIN_MODULE,
    Context,
    _monitor_prompts,
    _shown,
    _tokenize,
    encode_latent_pool,
    train_loop,
    write_checksums,
)

# the prompt categories of the quality gates (docs/SHAPEWORLD.md), in report order
CATEGORIES = ("common", "rare", "count4", "heldout")


def base_folder(ctx: Context) -> Path:
    """The DDIM-family model whose tokenizer, text encoder and VAE the flow model reuses."""
    folder = Path(ctx.cfg.base_model or default_model_dir())
    missing = [p for p in ("tokenizer", "text_encoder", "vae") if not (folder / p).is_dir()]
    if missing:
        raise FileNotFoundError(f"base model folder {folder} has no {', '.join(missing)}; give a finished "
                                "ShapeWorld pipeline folder with --base-model (made by 'dpok pretrain')")
    return folder


def load_components(ctx: Context) -> dict[str, Any]:
    """Tokenizer, both CLIP slots and the VAE of the base model, frozen, in SD3's classes."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = base_folder(ctx)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = text_encoder_with_projection(CLIPTextModel.from_pretrained(folder / "text_encoder"))
    encoder_2 = text_encoder_with_projection(CLIPTextModel.from_pretrained(folder / "text_encoder"))
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    vae.register_to_config(shift_factor=0.0)
    for m in (encoder, encoder_2, vae):
        m.eval().requires_grad_(False)
    return {"tokenizer": tokenizer, "tokenizer_2": tokenizer, "text_encoder": encoder, "text_encoder_2": encoder_2,
            "vae": vae}


def make_pipeline(parts: dict[str, Any], transformer: Any) -> Any:  # noqa: ANN401 - diffusers types
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=make_flow_scheduler(), text_encoder_3=None,
                                    tokenizer_3=None, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_ids(parts: dict[str, Any], input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's prompt embedding of token ids with the T5 tail folded to one token.

    Equals ``StableDiffusion3Pipeline.encode_prompt(..., max_sequence_length=1)`` without T5: the
    penultimate hidden states of both CLIP slots side by side (B, L, 2 x 64) followed by one zero
    token (B, L + 1, 128), and both slots' projected pooled states (B, 128).
    """
    states, pooled = [], []
    for encoder in (parts["text_encoder"], parts["text_encoder_2"]):
        out = encoder(input_ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(states, -1)
    return torch.cat([clip, clip.new_zeros(clip.shape[0], 1, clip.shape[2])], 1), torch.cat(pooled, -1)


def judge_pipeline(pipe: Any, prompts: list[str], images_per_prompt: int, steps: int, guidance: float,  # noqa: ANN401
                   seed: int) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1] of a (folded) SD3 pipeline, ``images_per_prompt`` per prompt."""
    batch = [p for p in prompts for _ in range(images_per_prompt)]
    return pipe(batch, num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=1,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


def stage_transformer(ctx: Context) -> None:
    from diffusers.training_utils import EMAModel

    from ..shapeworld.judge import is_aligned

    cfg = ctx.cfg
    parts = load_components(ctx)
    pool = encode_latent_pool(ctx, "transformer", parts["vae"], parts["tokenizer"])
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 5])
    transformer, ema_transformer = make_sd3_transformer(), make_sd3_transformer()
    ema_transformer.load_state_dict(transformer.state_dict())
    ema_transformer.requires_grad_(False)
    text_tokens = parts["tokenizer"].model_max_length + 1
    for model in (transformer, ema_transformer):
        fold_text_tokens(model, SD3_T5_TOKENS, text_tokens)  # exact, 16x fewer text tokens (see dpok.attention)
    ema = EMAModel(transformer.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    empty_ids = _tokenize(parts["tokenizer"], [""])
    scale = parts["vae"].config.scaling_factor

    def step_fn(step: int) -> dict[str, Any]:
        idx = torch.from_numpy(rng.integers(0, len(pool["mean"]), cfg.unet_batch))
        eps_z = torch.from_numpy(rng.standard_normal(pool["mean"][idx].shape)).float()
        x0 = (pool["mean"][idx] + pool["std"][idx] * eps_z) * scale
        noise = torch.from_numpy(rng.standard_normal(x0.shape)).float()
        t = torch.sigmoid(torch.from_numpy(rng.normal(cfg.flow_logit_mean, cfg.flow_logit_std, len(idx))).float())
        ids = pool["input_ids"][idx].clone()
        ids[torch.from_numpy(rng.random(len(idx)) < cfg.cfg_dropout)] = empty_ids
        with torch.no_grad():
            states, pooled = encode_ids(parts, ids)
        tb = t[:, None, None, None]
        pred = transformer(hidden_states=(1 - tb) * x0 + tb * noise, encoder_hidden_states=states,
                           pooled_projections=pooled, timestep=t * 1000).sample
        return {"loss": F.mse_loss(pred, noise - x0)}

    def after_step() -> None:
        ema.step(transformer.parameters())

    def eval_fn(step: int) -> dict[str, float]:
        ema.copy_to(ema_transformer.parameters())
        pipe = make_pipeline(parts, ema_transformer)
        out = {}
        for category, prompts in _monitor_prompts().items():
            img = judge_pipeline(pipe, prompts, cfg.eval_images, 20 if cfg.unet_steps > 50 else 2, 5.0, cfg.seed)
            batch = [p for p in prompts for _ in range(cfg.eval_images)]
            out[f"aligned_{category}"] = float(np.mean([is_aligned(i, p) for i, p in zip(img, batch)]))
        return out

    modules = {"transformer": transformer, "ema": ema}
    train_loop(ctx, "transformer", modules, list(transformer.parameters()), cfg.unet_lr, cfg.unet_steps, step_fn,
               rng, eval_fn, warmup=cfg.unet_warmup, after_step=after_step)
    ema.copy_to(ema_transformer.parameters())
    ema_transformer.save_pretrained(ctx.stage_dir("transformer") / "transformer")


def stage_export(ctx: Context, argv: list[str] | None) -> None:
    from diffusers import SD3Transformer2DModel

    cfg = ctx.cfg
    if not ctx.done("transformer"):
        raise RuntimeError(f"pretraining stage 'transformer' has not finished in {ctx.work}; run it first "
                           f"(dpok pretrain --family flow-matching --stages transformer --work-dir {ctx.work})")
    out = Path(cfg.output_dir or default_flow_model_dir())
    if out.resolve() == ctx.work.resolve() or (out.resolve().parent == ctx.work.resolve() and out.name in FLOW_STAGES):
        raise ValueError(f"output folder {out} would overwrite a stage folder of {ctx.work}")
    parts = load_components(ctx)
    pipe = make_pipeline(parts, SD3Transformer2DModel.from_pretrained(ctx.stage_dir("transformer") / "transformer"))
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    base = base_folder(ctx)
    for slot in ("tokenizer", "tokenizer_2"):  # what older transformers versions load
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(base / "tokenizer" / name, out / slot / name)
    _relative_sources(out)
    write_domain_file(out, DOMAIN_MODULE)
    command = "dpok " + " ".join(argv) if argv else "dpok pretrain --family flow-matching"
    settings = json.dumps(dataclasses.asdict(cfg), indent=2)
    (out / "PRETRAIN_COMMAND.txt").write_text(f"{command}\n\nSettings:\n{settings}\n")
    write_checksums(out)
    ctx.log(f"export: flow-matching pipeline -> {_shown(out)}")


def _relative_sources(out: Path) -> None:
    """Configs record the folder a part was loaded from (``_name_or_path``): keep it relative to the
    working directory, or just its name, so the shipped files name no machine's folders."""
    for config in out.glob("*/config.json"):
        data = json.loads(config.read_text())
        source = data.get("_name_or_path")
        if source and Path(source).is_absolute():
            data["_name_or_path"] = _shown(Path(source)) if not Path(_shown(Path(source))).is_absolute() \
                else Path(source).name
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def load_flow_pipeline(folder: Path) -> Any:  # noqa: ANN401 - diffusers types
    """The exported SD3 pipeline of ``folder``, text tokens folded as in training, progress bars off."""
    from diffusers import StableDiffusion3Pipeline

    from ..adapter import absent_components

    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True, **absent_components(str(folder)))
    pipe.set_progress_bar_config(disable=True)
    fold_text_tokens(pipe.transformer, SD3_T5_TOKENS, pipe.tokenizer_max_length + 1)
    return pipe


def evaluate_categories(pipe: Any, reward: AlignmentRewardModel, images: int, steps: int,  # noqa: ANN401
                        guidance: float, seed: int, categories: tuple[str, ...] = CATEGORIES,
                        log: Any = None) -> dict[str, Any]:  # noqa: ANN401
    """Alignment of ``pipe`` per prompt category: ``images`` samples of each prompt of the category
    (prompt i of a category drawn with seed ``seed * 1000 + i``), judged by the reward (r > 0.5) and
    by the geometric judge. Returns ``{"per_prompt": {prompt: ...}, "per_category": {category: ...}}``."""
    from ..shapeworld.judge import is_aligned

    sets = prompt_sets()
    result: dict[str, Any] = {"per_prompt": {}, "per_category": {}}
    for category in categories:
        rewards, judged = [], []
        for i, prompt in enumerate(sets[category]):
            img = judge_pipeline(pipe, [prompt], images, steps, guidance, seed * 1000 + i)
            r = reward.score(torch.from_numpy(img).permute(0, 3, 1, 2).float(), [parse_prompt(prompt)] * len(img))
            a, j = (r > 0.5).float().mean().item(), float(np.mean([is_aligned(im, prompt) for im in img]))
            result["per_prompt"][prompt] = {"category": category, "reward": r.mean().item(),
                                            "aligned_by_reward": a, "aligned_by_judge": j}
            rewards.append(a)
            judged.append(j)
        result["per_category"][category] = {"aligned_by_reward": float(np.mean(rewards)),
                                            "aligned_by_judge": float(np.mean(judged)),
                                            "prompts": len(sets[category])}
        if log is not None:
            log(f"{category}: aligned {np.mean(rewards):.1%} by the reward, {np.mean(judged):.1%} by the "
                f"geometric judge ({len(sets[category])} prompts x {images})")
    return result


def stage_report(ctx: Context) -> None:
    cfg = ctx.cfg
    out = Path(cfg.output_dir or default_flow_model_dir())
    pipe = load_flow_pipeline(out)
    reward = AlignmentRewardModel.load(Path(cfg.reward_output_dir or default_reward_dir()))
    report: dict[str, Any] = {"guidance_scale": cfg.report_guidance, "steps": cfg.report_steps,
                              "images_per_prompt": cfg.report_images, "sampler": "FlowMatchEulerDiscrete",
                              **evaluate_categories(pipe, reward, cfg.report_images, cfg.report_steps,
                                                    cfg.report_guidance, cfg.seed,
                                                    log=lambda line: ctx.log(f"report: {line}"))}
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.copy(ctx.log_path, out / "pretrain.log")
    write_checksums(out)
    if cfg.grid_path:
        from ..viz import save_prompt_grid

        grid_prompts = ["a red circle", "two blue squares", "a green triangle", "four red circles",
                        "an orange triangle", "two yellow squares and a white triangle",
                        "a red circle left of a blue square", "a cyan circle above a green square"]
        images = [judge_pipeline(pipe, [p], 6, cfg.report_steps, cfg.report_guidance, cfg.seed + i)
                  for i, p in enumerate(grid_prompts)]
        save_prompt_grid(images, grid_prompts, cfg.grid_path)
        ctx.log(f"report: grid of base samples -> {cfg.grid_path}")


def flow_runners(ctx: Context, argv: list[str] | None) -> dict[str, Any]:
    return {"transformer": lambda: stage_transformer(ctx), "export": lambda: stage_export(ctx, argv),
            "report": lambda: stage_report(ctx)}
