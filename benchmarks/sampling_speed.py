"""Sampling and UNet speed of the embedded ShapeWorld model (issue target: 32 images, 20 steps,
guidance, in <= 10 s on a 2-core CPU)."""

from __future__ import annotations

import argparse

import torch
from _common import header, peak_memory_mb, timeit

from dpok.adapter import DiffusionAdapter
from dpok.sampling import sample_trajectories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="shapeworld")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    adapter = DiffusionAdapter.from_pretrained(args.model)
    prompts = ["two blue squares"] * args.images
    header(f"sampling {args.images} images, model {args.model}")
    for steps in (20, 50):
        for guidance in (1.0, 5.0):
            gen = torch.Generator().manual_seed(0)
            t = timeit(lambda s=steps, w=guidance, g=gen: sample_trajectories(adapter, prompts, s, 1.0, w, g), args.repeat)
            label = "with guidance" if guidance > 1 else "no guidance  "
            print(f"{steps:3d} DDIM steps, {label}: {t:6.2f} s  ({args.images / t:6.1f} images/s)")
    unet = adapter.unet
    c, h, w = adapter.latent_shape
    emb = adapter.encode_prompts(prompts)
    for batch in (32, 64):
        x = torch.randn(batch, c, h, w)
        t = torch.full((batch,), 500)
        e = emb.cond[:1].expand(batch, -1, -1)
        with torch.no_grad():
            fwd = timeit(lambda x=x, t=t, e=e: unet(x, t, e).sample, args.repeat)
        unet.requires_grad_(True)

        def fwd_bwd(x: torch.Tensor = x, t: torch.Tensor = t, e: torch.Tensor = e) -> None:
            unet(x, t, e).sample.square().mean().backward()
            unet.zero_grad(set_to_none=True)

        fb = timeit(fwd_bwd, args.repeat)
        unet.requires_grad_(False)
        print(f"UNet batch {batch}: forward {fwd * 1000:7.1f} ms, forward+backward {fb * 1000:7.1f} ms")
    print(f"peak memory: {peak_memory_mb():.0f} MB")


if __name__ == "__main__":
    main()
