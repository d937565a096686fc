"""GPU benchmark on full-size model configurations with random weights (no download, no trained weights).

    python benchmarks/gpu_bench.py                                   # every family, dpok/ddpo-is/grpo, bf16
    python benchmarks/gpu_bench.py --families sd15 sdxl --batch 8 --find-max-batch
    python benchmarks/gpu_bench.py --scale tiny --device cpu         # the scaled-down run (tests, CPUs)

For each family (SD 1.5, SDXL, SD3.5-Medium, FLUX.1-dev: their published denoiser configurations)
and each algorithm, the pipeline is built in code with random weights and one LoRA training round
is run through dpok's own trainer (``--rounds``, the first a warm-up). Every denoiser call the round
makes is recorded (batch, with or without gradient), and the same calls are then timed bare: the
denoiser with classifier-free guidance batching and nothing else, so the ratio of the round's time
to the bare calls' is dpok's overhead. FLOPs of each kind of call are counted with
``torch.utils.flop_counter`` and give the model FLOP utilisation against ``--peak-tflops`` (the
GPU's dense bf16/fp16 peak; known GPUs are looked up). Peak memory, and with ``--find-max-batch``
the largest sampling batch whose round fits, are reported.

Text encoders keep their widths (what the denoiser reads) but T5-XXL keeps only ``--t5-layers``
layers: text is encoded once per batch, outside the denoising loop, and the full T5 would add 4.7B
random parameters to the start-up and nothing to the round. Writes docs/gpu_bench.md and
docs/gpu_bench/data.json (``--report``), with the device named.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FAMILIES = ("sd15", "sdxl", "sd3.5-medium", "flux-dev")
ALGORITHMS = ("dpok", "ddpo-is", "grpo")
RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd3.5-medium": 1024, "flux-dev": 1024}
# dense bf16/fp16 tensor-core peaks (TFLOP/s) of the data-centre GPUs this is likely to meet
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    p.add_argument("--scale", choices=("full", "tiny"), default="full",
                   help="full: the published configurations; tiny: the same layouts scaled down (CPU tests)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", choices=("bf16", "fp16", "no"), default="bf16")
    p.add_argument("--batch", type=int, default=4, help="sampling batch = samples per round = training minibatch")
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--rounds", type=int, default=2, help="rounds per configuration; the first is a warm-up")
    p.add_argument("--t5-layers", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense peak (0: look it up)")
    p.add_argument("--find-max-batch", action="store_true", help="double the batch until a round runs out of memory")
    p.add_argument("--max-batch-limit", type=int, default=128)
    p.add_argument("--report", default=str(ROOT / "docs" / "gpu_bench.md"))
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ pipelines
def _clip(tok, width: int, layers: int, heads: int, ff: int, projection: int = 0, act: str = "quick_gelu"):  # noqa: ANN001, ANN202
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=ff, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=tok.model_max_length, hidden_act=act,
                         projection_dim=projection or width, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    return CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)


def _t5(tok, width: int, layers: int, heads: int, ff: int):  # noqa: ANN001, ANN202
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tok), d_model=width, d_kv=width // heads, d_ff=ff, num_layers=layers,
                                   num_heads=heads, feed_forward_proj="gated-gelu", pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id))


def _vae(latent_channels: int, tiny: bool, **kw: object):  # noqa: ANN202
    from diffusers import AutoencoderKL

    blocks = (8, 16, 16, 16) if tiny else (128, 256, 512, 512)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=blocks,
                         layers_per_block=1 if tiny else 2, latent_channels=latent_channels,
                         norm_num_groups=8 if tiny else 32, **kw)


def build_pipeline(family: str, scale: str, folder: Path, t5_layers: int):  # noqa: ANN201
    """A ``family`` pipeline with random weights: the published denoiser configuration (``full``) or
    the same layout with small widths (``tiny``); tokenizers built in code (``folder`` holds their files)."""
    import diffusers
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from dpok.embedded.tokenizer import build_t5_tokenizer, build_tokenizer

    tiny = scale == "tiny"
    torch.manual_seed(0)
    w = (lambda full, small: small if tiny else full)  # noqa: E731

    def clip_tok(name: str):  # noqa: ANN202
        tok = build_tokenizer(folder / name)
        tok.model_max_length = w(77, 16)
        return tok

    ddim = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if family == "sd15":
        tok = clip_tok("tokenizer")
        unet = diffusers.UNet2DConditionModel(
            sample_size=w(64, 8), cross_attention_dim=w(768, 16), block_out_channels=w((320, 640, 1280, 1280), (16, 32)),
            down_block_types=w(("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), ("DownBlock2D", "CrossAttnDownBlock2D")),
            up_block_types=w(("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, ("CrossAttnUpBlock2D", "UpBlock2D")),
            layers_per_block=w(2, 1), attention_head_dim=w(8, 2), norm_num_groups=w(32, 8))
        return diffusers.StableDiffusionPipeline(
            vae=_vae(4, tiny), text_encoder=_clip(tok, w(768, 16), w(12, 1), w(12, 2), w(3072, 32)), tokenizer=tok,
            unet=unet, scheduler=ddim, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if family == "sdxl":
        tok, tok_2 = clip_tok("tokenizer"), clip_tok("tokenizer-2")
        unet = diffusers.UNet2DConditionModel(
            sample_size=w(128, 8), cross_attention_dim=w(2048, 32), block_out_channels=w((320, 640, 1280), (16, 32)),
            down_block_types=w(("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                               ("DownBlock2D", "CrossAttnDownBlock2D")),
            up_block_types=w(("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                             ("CrossAttnUpBlock2D", "UpBlock2D")),
            transformer_layers_per_block=w((1, 2, 10), (1, 1)), attention_head_dim=w((5, 10, 20), (2, 4)),
            layers_per_block=w(2, 1), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=w(256, 8), projection_class_embeddings_input_dim=w(2816, 6 * 8 + 16),
            norm_num_groups=w(32, 8))
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(4, tiny), text_encoder=_clip(tok, w(768, 16), w(12, 2), w(12, 2), w(3072, 32)),
            text_encoder_2=_clip(tok_2, w(1280, 16), w(32, 2), w(20, 2), w(5120, 32), projection=w(1280, 16), act="gelu"),
            tokenizer=tok, tokenizer_2=tok_2, unet=unet, scheduler=ddim, force_zeros_for_empty_prompt=True,
            add_watermarker=False)
    t5_tok = build_t5_tokenizer(folder / "tokenizer-t5", w(256 if family.startswith("sd3") else 512, 16))
    t5 = _t5(t5_tok, w(4096, 32), t5_layers, w(64, 2), w(10240, 32))
    if family == "sd3.5-medium":
        tok, tok_2 = clip_tok("tokenizer"), clip_tok("tokenizer-2")
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=w(128, 8), patch_size=2, in_channels=w(16, 4), out_channels=w(16, 4), num_layers=w(24, 2),
            attention_head_dim=w(64, 8), num_attention_heads=w(24, 2), joint_attention_dim=w(4096, 32),
            caption_projection_dim=w(1536, 16), pooled_projection_dim=w(2048, 32), pos_embed_max_size=w(384, 8),
            dual_attention_layers=w(tuple(range(13)), (0,)), qk_norm="rms_norm")
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            vae=_vae(w(16, 4), tiny, scaling_factor=1.5305, shift_factor=0.0609),
            text_encoder=_clip(tok, w(768, 16), w(12, 2), w(12, 2), w(3072, 32), projection=w(768, 16)),
            text_encoder_2=_clip(tok_2, w(1280, 16), w(32, 2), w(20, 2), w(5120, 32), projection=w(1280, 16), act="gelu"),
            text_encoder_3=t5, tokenizer=tok, tokenizer_2=tok_2, tokenizer_3=t5_tok)
    if family == "flux-dev":
        tok = clip_tok("tokenizer")
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=w(64, 16), num_layers=w(19, 1), num_single_layers=w(38, 1),
            attention_head_dim=w(128, 8), num_attention_heads=w(24, 2), joint_attention_dim=w(4096, 32),
            pooled_projection_dim=w(768, 16), guidance_embeds=True, axes_dims_rope=w((16, 56, 56), (2, 2, 4)))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                    max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
        return diffusers.FluxPipeline(
            scheduler=scheduler, vae=_vae(w(16, 4), tiny, scaling_factor=0.3611, shift_factor=0.1159),
            text_encoder=_clip(tok, w(768, 16), w(12, 2), w(12, 2), w(3072, 32)), tokenizer=tok,
            text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


# ------------------------------------------------------------------------------------ measuring
class CallRecorder:
    """Wraps ``adapter.noise_pred`` to count its calls by (batch, gradient on, guidance scale)."""

    def __init__(self, adapter: Any) -> None:
        self.adapter, self.calls = adapter, Counter()
        self.inputs: dict[tuple, tuple] = {}
        self._original = adapter.noise_pred

    def __enter__(self) -> CallRecorder:
        def recorded(latents, timesteps, embeds, guidance_scale=1.0, reference=False):  # noqa: ANN001, ANN202
            key = (len(latents), torch.is_grad_enabled(), float(guidance_scale))
            self.calls[key] += 1
            self.inputs.setdefault(key, (latents.detach(), timesteps.detach(), embeds))
            return self._original(latents, timesteps, embeds, guidance_scale, reference=reference)

        self.adapter.noise_pred = recorded
        return self

    def __exit__(self, *exc: object) -> None:
        self.adapter.noise_pred = self._original


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_call(adapter: Any, key: tuple, inputs: tuple) -> tuple[float, float]:
    """(seconds, FLOPs) of one bare denoiser call of this kind: forward, and backward if it had gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    latents, timesteps, embeds = inputs
    _, grad, scale = key
    params = adapter.trainable_parameters()

    def once() -> None:
        with torch.set_grad_enabled(grad):
            out = adapter.noise_pred(latents, timesteps, embeds, scale)
            if grad:
                out.float().pow(2).mean().backward()
        for p in params:
            p.grad = None

    once()  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        once()
    _sync(adapter.device)
    t0, repeats = time.perf_counter(), 3
    for _ in range(repeats):
        once()
    _sync(adapter.device)
    return (time.perf_counter() - t0) / repeats, float(counter.get_total_flops())


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float, str]:
    if device.type != "cuda":
        from dpok.utils.machine import cpu_description

        return args.peak_tflops, cpu_description()
    name = torch.cuda.get_device_name(device)
    if args.peak_tflops:
        return args.peak_tflops, name
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0), name


def run_config(args: argparse.Namespace, family: str, algorithm: str, batch: int, folder: Path) -> dict[str, Any]:
    """One configuration: ``args.rounds`` rounds through the trainer; the last one measured."""
    from dpok.config import build_config
    from dpok.run_parts import build_run
    from dpok.trainer import Trainer

    device = torch.device(args.device)
    pipe = build_pipeline(family, args.scale, folder / "tokenizers", args.t5_layers)
    size = RESOLUTION[family] if args.scale == "full" else 64
    cfg = build_config(None, {
        "model": family, "reward": "jpeg-compressibility", "prompt": ["a photo of a cat"], "algorithm": algorithm,
        "rounds": args.rounds, "samples_per_round": batch, "sample_batch_size": batch, "minibatch_size": batch,
        "num_steps": args.steps, "guidance_scale": 3.5 if family == "flux-dev" else 5.0,
        "eta": 1.0 if family in ("sd15", "sdxl") else 0.7, "mixed_precision": args.precision, "device": args.device,
        "eval_images": 1, "output_dir": str(folder / f"{family}-{algorithm}-{batch}"), "report_to": ["none"],
        "stat_min_count": 1})
    trainer = Trainer(None, parts=build_run(cfg, pipeline=pipe))
    adapter = trainer.adapter
    for _ in range(args.rounds - 1):
        trainer.train_round()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with CallRecorder(adapter) as rec:
        _sync(device)
        t0 = time.perf_counter()
        metrics = trainer.train_round()
        _sync(device)
        round_s = time.perf_counter() - t0
    bare_s = flops = 0.0
    kinds = []
    for key, n in rec.calls.items():
        seconds, f = bare_call(adapter, key, rec.inputs[key])
        bare_s, flops = bare_s + n * seconds, flops + n * f
        kinds.append({"batch": key[0], "grad": key[1], "guidance": key[2], "calls": n, "bare_s": seconds, "flops": f})
    peak, device_name = peak_tflops(args, device)
    achieved = flops / round_s / 1e12
    return {
        "family": family, "algorithm": algorithm, "batch": batch, "scale": args.scale, "precision": args.precision,
        "steps": args.steps, "resolution": size, "device": device_name,
        "denoiser_params_m": sum(p.numel() for p in adapter.unet.parameters()) / 1e6,
        "round_s": round_s, "sample_s": metrics["time/sample_s"], "update_s": metrics["time/update_s"],
        "samples_per_s": batch / round_s, "bare_s": bare_s, "round_over_bare": round_s / bare_s if bare_s else None,
        "tflops_per_s": achieved, "mfu": achieved / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "calls": kinds,
    }


def fits(args: argparse.Namespace, family: str, algorithm: str, batch: int, folder: Path) -> bool:
    try:
        run_config(argparse.Namespace(**{**vars(args), "rounds": 1}), family, algorithm, batch, folder)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def largest_batch(args: argparse.Namespace, family: str, algorithm: str, folder: Path) -> int:
    """The largest power-of-two sampling batch (from ``--batch``) whose round fits in memory."""
    batch = args.batch
    while batch * 2 <= args.max_batch_limit and fits(args, family, algorithm, batch * 2, folder):
        batch *= 2
    return batch


def write_report(rows: list[dict[str, Any]], path: Path) -> None:
    data = path.parent / path.stem / "data.json"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(rows, indent=1) + "\n")
    devices = sorted({r["device"] for r in rows})
    lines = [
        "# GPU benchmark: full-size configurations with random weights",
        "",
        f"Written by `benchmarks/gpu_bench.py` on {', '.join(devices)} ({rows[0]['scale']} configurations, "
        f"{rows[0]['precision']}, {rows[0]['steps']} steps, LoRA rank 4). One round of each algorithm after a "
        "warm-up round; 'bare' is the same denoiser calls made alone (forward, and backward where the round took "
        "gradients); MFU against the device's dense peak. Raw numbers: `docs/gpu_bench/data.json`.",
        "",
        "| family | algorithm | batch | px | denoiser (M params) | samples/s | round / bare | TFLOP/s | MFU "
        "| peak memory (GiB) | largest batch |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        lines.append(f"| {r['family']} | {r['algorithm']} | {r['batch']} | {r['resolution']} | "
                     f"{r['denoiser_params_m']:.0f} | {r['samples_per_s']:.3f} | {r['round_over_bare']:.2f}x | "
                     f"{r['tflops_per_s']:.4f} | {mfu} | {mem} | {r.get('largest_batch', 'not searched')} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --scale tiny --device cpu --precision no for the scaled-down run")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            for algorithm in args.algorithms:
                row = run_config(args, family, algorithm, args.batch, Path(tmp))
                if args.find_max_batch:
                    row["largest_batch"] = largest_batch(args, family, algorithm, Path(tmp))
                rows.append(row)
                print(f"{family:>13} {algorithm:>8}: {row['samples_per_s']:.3f} samples/s, round/bare "
                      f"{row['round_over_bare']:.2f}x, {row['tflops_per_s']:.2f} TFLOP/s, MFU "
                      f"{'n/a' if row['mfu'] is None else format(row['mfu'], '.1%')}", flush=True)
                with contextlib.suppress(Exception):
                    torch.cuda.empty_cache()
    write_report(rows, Path(args.report))
    print(f"wrote {args.report}")
    return rows


if __name__ == "__main__":
    main()
