"""``dpok pretrain``: train the embedded ShapeWorld model and its alignment reward from scratch.

Stages, in order (each resumable, each leaving its result in ``work_dir/<stage>``):

1. ``tokenizer`` - BPE merges for the grammar's words (CLIP tokenizer files).
2. ``text``      - the CLIP text encoder, trained to make its pooled (EOS) state predict the
                   caption's meaning (per-type counts, relation, its two objects), then frozen,
                   as Stable Diffusion freezes CLIP's.
3. ``vae``       - AutoencoderKL on 32 px crops of renders (conv only, so crops are exact and 4x
                   cheaper); the latent scaling factor is 1/std of the latents, as in SD.
4. ``unet``      - the UNet on VAE latents of the biased caption mix, epsilon prediction, 10 %
                   empty-caption dropout for classifier-free guidance, EMA weights.
5. ``reward``    - the ``shapeworld-alignment`` reward model (a per-cell object detector) on
                   labelled scenes, with blur, noise, colour jitter and VAE round trips so that it
                   also reads generated images.
6. ``export``    - the StableDiffusionPipeline folder, the reward folder, checksums and the log.
7. ``report``    - alignment of the exported model per prompt category, judged by the reward.

The text encoder and VAE see all 24 (color, shape) pairs, uniformly (generic components, like
CLIP and SD's VAE); only the UNet's captions follow the biased mix with held-out pairs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..assets import default_model_dir, default_reward_dir
from ..domains import write_domain_file
from ..shapeworld import ALL_PAIRS, IMAGE_SIZE, parse_prompt, prompt_sets, render_prompt, render_scene
from ..shapeworld.distribution import (
    misaligned_variant,
    sample_caption,
    sample_labelled_scene,
    sample_training_example,
)
from ..shapeworld.render import Scene
from .alignment import CELL, NUM_COUNT_CLASSES, AlignmentNet, AlignmentRewardModel, count_log_probs
from .architecture import make_scheduler, make_text_encoder, make_unet, make_vae
from .pretrain_config import FLOW_STAGES, STAGES, PretrainConfig, tiny_config  # noqa: F401 - where they were first
from .stages import (
    DOMAIN_MODULE,
    Context,
    _monitor_prompts,
    _run_stages,
    _shown,
    _tokenize,
    encode_latent_pool,
    to_tensor,
    train_loop,
    write_checksums,
)
from .tokenizer import build_tokenizer

_PAIR_INDEX = {p: i for i, p in enumerate(ALL_PAIRS)}
TEXT_COUNT_CLASSES = 5  # captions count 0..4 of a type


# ----------------------------------------------------------------------------------------- helpers

def _load_tokenizer(ctx: Context):  # noqa: ANN202 - transformers type
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(ctx.stage_dir("tokenizer"))


def _require(ctx: Context, *names: str) -> None:
    for n in names:
        if not ctx.done(n):
            raise RuntimeError(f"pretraining stage {n!r} has not finished in {ctx.work}; run it first "
                               f"(dpok pretrain --stages {n} --work-dir {ctx.work})")


# ------------------------------------------------------------------------------------------ stages

def stage_tokenizer(ctx: Context) -> None:
    build_tokenizer(ctx.stage_dir("tokenizer"))


def _caption_targets(parsed_list) -> dict[str, torch.Tensor]:  # noqa: ANN001
    from .alignment import count_targets

    counts = torch.stack([count_targets(p, TEXT_COUNT_CLASSES) for p in parsed_list])
    rel = torch.tensor([0 if p.relation is None else 1 + ("left of", "above").index(p.relation) for p in parsed_list])
    subj = torch.tensor([_PAIR_INDEX[p.groups[0].pair] if p.relation else len(ALL_PAIRS) for p in parsed_list])
    obj = torch.tensor([_PAIR_INDEX[p.groups[1].pair] if p.relation else len(ALL_PAIRS) for p in parsed_list])
    return {"counts": counts, "relation": rel, "subject": subj, "object": obj}


class CaptionHead(nn.Module):
    """Reads a caption's meaning off the text encoder's pooled state (training only)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        n = len(ALL_PAIRS)
        self.counts = nn.Linear(width, n * TEXT_COUNT_CLASSES)
        self.relation = nn.Linear(width, 3)
        self.subject = nn.Linear(width, n + 1)
        self.object = nn.Linear(width, n + 1)

    def loss(self, pooled: torch.Tensor, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        counts = self.counts(pooled).view(len(pooled), -1, TEXT_COUNT_CLASSES)
        heads = [(counts.flatten(0, 1), t["counts"].flatten()), (self.relation(pooled), t["relation"]),
                 (self.subject(pooled), t["subject"]), (self.object(pooled), t["object"])]
        loss = sum(F.cross_entropy(logits, target) for logits, target in heads)
        exact = (counts.argmax(-1) == t["counts"]).all(-1)
        for logits, target in heads[1:]:
            exact &= logits.argmax(-1) == target
        return loss, exact.float().mean().item()


def stage_text(ctx: Context) -> None:
    cfg = ctx.cfg
    _require(ctx, "tokenizer")
    tok = _load_tokenizer(ctx)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 1])
    encoder = make_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id)
    head = CaptionHead(encoder.config.hidden_size)

    def batch(r: np.random.Generator, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parsed = [sample_caption(r, biased=False) for _ in range(n)]
        return _tokenize(tok, [p.text() for p in parsed]), _caption_targets(parsed)

    def step_fn(step: int) -> dict[str, Any]:
        ids, targets = batch(rng, cfg.text_batch)
        loss, acc = head.loss(encoder(ids).pooler_output, targets)
        return {"loss": loss, "exact": acc}

    def eval_fn(step: int) -> dict[str, float]:
        ids, targets = batch(np.random.default_rng([cfg.seed, 99]), 1024)
        with torch.no_grad():
            _, acc = head.loss(encoder(ids).pooler_output, targets)
        return {"caption_exact_match": acc}

    modules = {"encoder": encoder, "head": head}
    params = [p for m in modules.values() for p in m.parameters()]
    train_loop(ctx, "text", modules, params, cfg.text_lr, cfg.text_steps, step_fn, rng, eval_fn)
    encoder.save_pretrained(ctx.stage_dir("text") / "text_encoder")


def _random_crops(images: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    if size >= images.shape[-1]:
        return images
    hi = images.shape[-1] - size + 1
    out = []
    for img in images:
        y, x = (int(v) for v in rng.integers(0, hi, size=2))
        out.append(img[:, y : y + size, x : x + size])
    return torch.stack(out)


def reconstruction_alignment(vae, n: int, seed: int) -> float:  # noqa: ANN001
    """Share of fresh renders whose VAE reconstruction the geometric judge still finds aligned."""
    from ..shapeworld.judge import is_aligned

    rng = np.random.default_rng([seed, 7])
    examples = [sample_training_example(rng, biased=False) for _ in range(n)]
    x = to_tensor([e[0] for e in examples]) * 2 - 1
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    rec = ((rec.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return float(np.mean([is_aligned(r, e[1]) for r, e in zip(rec, examples)]))


def stage_vae(ctx: Context) -> None:
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 2])
    vae = make_vae()

    def step_fn(step: int) -> dict[str, Any]:
        images = to_tensor([sample_training_example(rng, biased=False)[0] for _ in range(cfg.vae_batch)])
        x = _random_crops(images, cfg.vae_crop, rng) * 2 - 1
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        mse, l1 = F.mse_loss(rec, x), F.l1_loss(rec, x)
        kl = dist.kl().mean() / x[0].numel()
        return {"loss": mse + l1 + cfg.vae_kl_weight * kl * x[0].numel(), "mse": mse.item(), "kl": kl.item()}

    def eval_fn(step: int) -> dict[str, float]:
        return {"recon_aligned": reconstruction_alignment(vae, 256 if cfg.vae_steps > 50 else 4, cfg.seed)}

    train_loop(ctx, "vae", {"vae": vae}, list(vae.parameters()), cfg.vae_lr, cfg.vae_steps, step_fn, rng, eval_fn)
    # Stable Diffusion's convention: scale latents to unit variance for the UNet.
    erng = np.random.default_rng([cfg.seed, 8])
    x = to_tensor([sample_training_example(erng, biased=False)[0] for _ in range(512 if cfg.vae_steps > 50 else 8)])
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.sample()
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    ctx.log(f"vae: scaling_factor {vae.config.scaling_factor:.4f}")
    vae.save_pretrained(ctx.stage_dir("vae") / "vae")


def _load_vae(ctx: Context):  # noqa: ANN202
    from diffusers import AutoencoderKL

    _require(ctx, "vae")
    return AutoencoderKL.from_pretrained(ctx.stage_dir("vae") / "vae").eval().requires_grad_(False)


def _cell_labels(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-cell type (B, 8, 8) (0 = none, k + 1 = type k), in-cell centroid offsets (B, 2, 8, 8),
    their mask (B, 8, 8), and per-type count classes (B, 24) of scenes."""
    from .alignment import CELL, GRID

    cls = torch.zeros(len(scenes), GRID, GRID, dtype=torch.long)
    off = torch.zeros(len(scenes), 2, GRID, GRID)
    counts = torch.zeros(len(scenes), len(ALL_PAIRS), dtype=torch.long)
    for b, scene in enumerate(scenes):
        for s in scene:
            cx, cy = s.centroid
            col, row = int(cx // CELL), int(cy // CELL)
            cls[b, row, col] = _PAIR_INDEX[s.pair] + 1
            off[b, 0, row, col] = cx / CELL - col
            off[b, 1, row, col] = cy / CELL - row
            counts[b, _PAIR_INDEX[s.pair]] += 1
    return cls, off, cls > 0, counts.clamp_max(NUM_COUNT_CLASSES - 1)


def _augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Blur, colour jitter and pixel noise of the strength seen in generated images."""
    b, c, h, w = x.shape
    sigma = torch.from_numpy(rng.uniform(0, 1.0, b)).float().clamp_min(1e-3)
    k = torch.arange(-2, 3).float()
    kernels = torch.exp(-(k[None] ** 2) / (2 * sigma[:, None] ** 2))
    kernels = (kernels / kernels.sum(-1, keepdim=True)).repeat_interleave(c, 0)  # (b*c, 5)
    # one grouped convolution per axis: each image channel gets its own image's kernel
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="replicate")
    y = F.conv2d(y, kernels.view(b * c, 1, 1, 5), groups=b * c)
    y = F.conv2d(y, kernels.view(b * c, 1, 5, 1), groups=b * c).view(b, c, h, w)
    gain = 1 + torch.from_numpy(rng.uniform(-0.08, 0.08, (b, 3, 1, 1))).float()
    noise = torch.from_numpy(rng.normal(0, 1, x.shape)).float() * torch.from_numpy(rng.uniform(0, 0.05, (b, 1, 1, 1))).float()
    return (y * gain + noise).clamp(0, 1)


def _noise_images(n: int, rng: np.random.Generator) -> torch.Tensor:
    """Pure noise, smooth noise and blank images: none shows any object."""
    x = torch.from_numpy(rng.uniform(0, 1, (n, 3, IMAGE_SIZE, IMAGE_SIZE))).float()
    smooth = F.interpolate(torch.from_numpy(rng.uniform(0, 1, (n, 3, 8, 8))).float(), size=IMAGE_SIZE, mode="bilinear")
    kind = torch.from_numpy(rng.integers(0, 3, n))[:, None, None, None]
    return torch.where(kind == 0, x, torch.where(kind == 1, smooth, torch.zeros_like(x)))


def reward_accuracy(model: AlignmentRewardModel, n: int, seed: int) -> dict[str, float]:
    """Fresh renders of pretraining-mix and all-pair prompts vs one-edit misaligned prompts.

    ``exact_match``: share of (image, prompt) pairs classified right at r > 0.5 (aligned and
    misaligned both counted); ``ranking``: share where the aligned prompt scores higher;
    ``noise_reward``: mean r of blank and noise images for the same prompts.
    """
    rng = np.random.default_rng([seed, 11])
    parsed = [sample_caption(rng, biased=bool(i % 2)) for i in range(n)]
    images = to_tensor([render_prompt(p, rng)[0] for p in parsed])
    wrong = [misaligned_variant(p, rng) for p in parsed]
    r_true = model.score(images, parsed)
    r_false = model.score(images, wrong)
    r_noise = model.score(_noise_images(n, rng), parsed)
    correct = torch.cat([r_true > 0.5, r_false <= 0.5]).float()
    return {"exact_match": correct.mean().item(), "ranking": (r_true > r_false).float().mean().item(),
            "aligned_reward": r_true.mean().item(), "misaligned_reward": r_false.mean().item(),
            "noise_reward": r_noise.mean().item(), "noise_reward_max": r_noise.max().item()}


def stage_reward(ctx: Context) -> None:
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 3])
    vae = _load_vae(ctx) if ctx.done("vae") else None
    net = AlignmentNet()
    model = AlignmentRewardModel(net)

    def step_fn(step: int) -> dict[str, Any]:
        n_noise = max(1, cfg.reward_batch // 16)
        scenes = [sample_labelled_scene(rng) for _ in range(cfg.reward_batch - n_noise)]
        x = to_tensor([render_scene(s) for s in scenes])
        n_vae = int(len(x) * cfg.reward_vae_fraction) if vae is not None else 0
        if n_vae:
            with torch.no_grad():
                rec = vae.decode(vae.encode(x[:n_vae] * 2 - 1).latent_dist.sample()).sample
            x = torch.cat([((rec + 1) / 2).clamp(0, 1), x[n_vae:]])
        x = torch.cat([_augment(x, rng), _noise_images(n_noise, rng)])
        cls, off, mask, counts = _cell_labels(scenes + [()] * n_noise)
        logits, pred_off = net(x)
        ce = F.cross_entropy(logits, cls, reduction="sum") / len(x)
        l1 = ((pred_off - off).abs().sum(1) * mask).sum() / mask.sum().clamp_min(1)
        count_nll = -count_log_probs(logits).gather(-1, counts[..., None]).sum() / len(x)
        loss = ce + 5 * l1 + 0.2 * count_nll
        return {"loss": loss, "cell_ce": ce.item(), "offset_l1_px": l1.item() * CELL, "count_nll": count_nll.item()}

    def eval_fn(step: int) -> dict[str, float]:
        net.eval()
        out = reward_accuracy(model, 512 if cfg.reward_steps > 50 else 8, cfg.seed)
        net.train()
        return out

    train_loop(ctx, "reward", {"net": net}, list(net.parameters()), cfg.reward_lr, cfg.reward_steps, step_fn, rng, eval_fn)
    model.save(ctx.stage_dir("reward") / "model")


def sample_latents(unet, text_encoder, tok, scheduler, prompts: list[str], guidance: float, steps: int,  # noqa: ANN001
                   generator: torch.Generator) -> torch.Tensor:
    """Plain DDIM (eta 0) with classifier-free guidance, for monitoring; returns x_0 latents."""
    with torch.no_grad():
        cond = text_encoder(_tokenize(tok, prompts))[0]
        uncond = text_encoder(_tokenize(tok, [""] * len(prompts)))[0]
        emb = torch.cat([uncond, cond])
        latents = torch.randn(len(prompts), unet.config.in_channels, unet.config.sample_size,
                              unet.config.sample_size, generator=generator)
        scheduler.set_timesteps(steps)
        for t in scheduler.timesteps:
            eps_u, eps_c = unet(torch.cat([latents] * 2), t, emb).sample.chunk(2)
            latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
    return latents


def stage_unet(ctx: Context) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from transformers import CLIPTextModel

    from ..shapeworld.judge import is_aligned

    cfg = ctx.cfg
    _require(ctx, "tokenizer", "text", "vae")
    tok = _load_tokenizer(ctx)
    text_encoder = CLIPTextModel.from_pretrained(ctx.stage_dir("text") / "text_encoder").eval().requires_grad_(False)
    vae = _load_vae(ctx)
    pool = encode_latent_pool(ctx, "unet", vae, tok)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 5])
    unet = make_unet()
    ema_unet = make_unet()
    ema_unet.load_state_dict(unet.state_dict())
    ema_unet.requires_grad_(False)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    noise_scheduler = DDPMScheduler.from_config(make_scheduler().config)
    empty_ids = _tokenize(tok, [""])
    scale = vae.config.scaling_factor

    def step_fn(step: int) -> dict[str, Any]:
        idx = torch.from_numpy(rng.integers(0, len(pool["mean"]), cfg.unet_batch))
        eps_z = torch.from_numpy(rng.standard_normal(pool["mean"][idx].shape)).float()
        latents = (pool["mean"][idx] + pool["std"][idx] * eps_z) * scale
        noise = torch.from_numpy(rng.standard_normal(latents.shape)).float()
        t = torch.from_numpy(rng.integers(0, noise_scheduler.config.num_train_timesteps, len(idx)))
        ids = pool["input_ids"][idx].clone()
        drop = torch.from_numpy(rng.random(len(idx)) < cfg.cfg_dropout)
        ids[drop] = empty_ids
        with torch.no_grad():
            emb = text_encoder(ids)[0]
        pred = unet(noise_scheduler.add_noise(latents, noise, t), t, emb).sample
        return {"loss": F.mse_loss(pred, noise)}

    def after_step() -> None:
        ema.step(unet.parameters())

    def eval_fn(step: int) -> dict[str, float]:
        ema.copy_to(ema_unet.parameters())
        gen = torch.Generator().manual_seed(cfg.seed)
        out = {}
        for category, prompts in _monitor_prompts().items():
            batch = [p for p in prompts for _ in range(cfg.eval_images)]
            z = sample_latents(ema_unet, text_encoder, tok, make_scheduler(), batch, 5.0, 20, gen)
            with torch.no_grad():
                img = ((vae.decode(z / scale).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
            out[f"aligned_{category}"] = float(np.mean([is_aligned(i, p) for i, p in zip(img, batch)]))
        return out

    modules = {"unet": unet, "ema": ema}  # EMAModel has state_dict / load_state_dict
    train_loop(ctx, "unet", modules, list(unet.parameters()), cfg.unet_lr, cfg.unet_steps, step_fn, rng, eval_fn,
               warmup=cfg.unet_warmup, after_step=after_step)
    ema.copy_to(ema_unet.parameters())
    ema_unet.save_pretrained(ctx.stage_dir("unet") / "unet")


def stage_export(ctx: Context, argv: list[str] | None) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    cfg = ctx.cfg
    _require(ctx, "tokenizer", "text", "vae", "reward", "unet")
    out = Path(cfg.output_dir or default_model_dir())
    reward_out = Path(cfg.reward_output_dir or default_reward_dir())
    pipe = StableDiffusionPipeline(
        vae=_load_vae(ctx),
        text_encoder=CLIPTextModel.from_pretrained(ctx.stage_dir("text") / "text_encoder"),
        tokenizer=_load_tokenizer(ctx),
        unet=UNet2DConditionModel.from_pretrained(ctx.stage_dir("unet") / "unet"),
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for folder in (out, reward_out):
        if ctx.work.resolve() in folder.resolve().parents and folder.resolve().parent == ctx.work.resolve():
            raise ValueError(f"output folder {folder} would overwrite a stage folder of {ctx.work}")
        if folder.exists():
            shutil.rmtree(folder)
    pipe.save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # what older transformers versions load
        shutil.copy(ctx.stage_dir("tokenizer") / name, out / "tokenizer" / name)
    shutil.copytree(ctx.stage_dir("reward") / "model", reward_out)
    write_domain_file(out, DOMAIN_MODULE)  # the model's prompts, grammar and judge are ShapeWorld's
    command = "dpok " + " ".join(argv) if argv else "dpok pretrain"  # argv starts with the subcommand
    settings = json.dumps(dataclasses.asdict(cfg), indent=2)
    for folder in (out, reward_out):
        (folder / "PRETRAIN_COMMAND.txt").write_text(f"{command}\n\nSettings:\n{settings}\n")
        write_checksums(folder)
    ctx.log(f"export: pipeline -> {_shown(out)}, alignment reward -> {_shown(reward_out)}")


def stage_report(ctx: Context) -> None:
    from diffusers import StableDiffusionPipeline

    cfg = ctx.cfg
    out = Path(cfg.output_dir or default_model_dir())
    reward_out = Path(cfg.reward_output_dir or default_reward_dir())
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    reward = AlignmentRewardModel.load(reward_out)
    sets = prompt_sets()
    categories = {k: sets[k] for k in ("common", "rare", "count4", "heldout")}
    report: dict[str, Any] = {"guidance_scale": cfg.report_guidance, "steps": cfg.report_steps,
                              "images_per_prompt": cfg.report_images, "per_prompt": {}, "per_category": {}}
    from ..shapeworld.judge import is_aligned

    for category, prompts in categories.items():
        rewards, judged = [], []
        for i, prompt in enumerate(prompts):
            gen = torch.Generator().manual_seed(cfg.seed * 1000 + i)
            img = pipe([prompt] * cfg.report_images, num_inference_steps=cfg.report_steps,
                       guidance_scale=cfg.report_guidance, generator=gen, output_type="np").images
            x = torch.from_numpy(img).permute(0, 3, 1, 2).float()
            r = reward.score(x, [parse_prompt(prompt)] * len(x))
            a = (r > 0.5).float().mean().item()
            j = float(np.mean([is_aligned(im, prompt) for im in img]))
            report["per_prompt"][prompt] = {"category": category, "reward": r.mean().item(),
                                            "aligned_by_reward": a, "aligned_by_judge": j}
            rewards.append(a)
            judged.append(j)
        report["per_category"][category] = {"aligned_by_reward": float(np.mean(rewards)),
                                            "aligned_by_judge": float(np.mean(judged)),
                                            "prompts": len(prompts)}
        ctx.log(f"report: {category}: aligned {np.mean(rewards):.1%} by the reward, "
                f"{np.mean(judged):.1%} by the geometric judge ({len(prompts)} prompts x {cfg.report_images})")
    report["reward_accuracy"] = reward_accuracy(reward, 512 if cfg.reward_steps > 50 else 8, cfg.seed + 1)
    ctx.log("report: reward model on fresh renders: "
            + " ".join(f"{k} {v:.3f}" for k, v in report["reward_accuracy"].items()))
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
    shutil.copy(ctx.log_path, out / "pretrain.log")
    write_checksums(out)
    if cfg.grid_path:
        from ..viz import save_prompt_grid

        grid_prompts = ["a red circle", "two blue squares", "a green triangle", "four red circles",
                        "an orange triangle", "two yellow squares and a white triangle",
                        "a red circle left of a blue square", "a cyan circle above a green square"]
        images = [pipe([p] * 6, num_inference_steps=cfg.report_steps, guidance_scale=cfg.report_guidance,
                       generator=torch.Generator().manual_seed(cfg.seed + i), output_type="np").images
                  for i, p in enumerate(grid_prompts)]
        save_prompt_grid(images, grid_prompts, cfg.grid_path)
        ctx.log(f"report: grid of base samples -> {cfg.grid_path}")


def run_pretrain(cfg: PretrainConfig, argv: list[str] | None = None) -> int:
    cfg.validate()
    ctx = Context(cfg)
    ctx.log(f"pretrain: stages {cfg.stage_list()} in {ctx.work} (seed {cfg.seed}, torch threads {torch.get_num_threads()})")
    if cfg.family == "flow-matching":
        from .pretrain_flow import flow_runners  # noqa: PLC0415 - torch-heavy, flow only

        return _run_stages(ctx, flow_runners(ctx, argv), FLOW_STAGES)
    runners: dict[str, Callable[[], None]] = {
        "tokenizer": lambda: stage_tokenizer(ctx),
        "text": lambda: stage_text(ctx),
        "vae": lambda: stage_vae(ctx),
        "reward": lambda: stage_reward(ctx),
        "unet": lambda: stage_unet(ctx),
        "export": lambda: stage_export(ctx, argv),
        "report": lambda: stage_report(ctx),
    }
    return _run_stages(ctx, runners, STAGES)


