"""The denoiser's speed options (--channels-last, --autocast bf16, --compile) on a tiny random SD1 pipeline.

Each must keep what training relies on: sampling and the update compute the same thing (the ratio
is 1 before an update, to a stated tolerance), gradients reach the LoRA weights, the module and its
state-dict names are unchanged, and outputs stay close to the stock call's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dpok.adapter import DiffusionAdapter
from dpok.config import build_config
from dpok.sampling import evaluate_log_probs, sample_in_batches

PROMPTS = ["a red circle", "two blue squares"]
STEPS, GUIDANCE, ETA = 4, 5.0, 1.0


def lora_adapter(folder: Path) -> DiffusionAdapter:
    adapter = DiffusionAdapter.from_pretrained(str(folder))
    torch.manual_seed(0)  # LoRA A's initialisation
    adapter.add_lora(rank=2, alpha=2.0)
    with torch.no_grad():  # LoRA B starts at 0: make the adapters change the output
        for name, p in adapter.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return adapter


def max_ratio_error(adapter: DiffusionAdapter) -> float:
    """max |exp(log pi(update) - log pi(sampling)) - 1| over every step of two samples, the update
    evaluating all steps in one batch as the trainer does."""
    traj = sample_in_batches(adapter, PROMPTS, 2, STEPS, ETA, GUIDANCE, torch.Generator().manual_seed(0),
                             logprob_reduce="mean")
    n, t = traj.batch_size, traj.num_steps
    embeds = traj.embeds[torch.arange(n).repeat_interleave(t)]
    with torch.no_grad():
        log_probs, _, _ = evaluate_log_probs(adapter, traj.latents.flatten(0, 1), traj.next_latents.flatten(0, 1),
                                             traj.timesteps.repeat(n), embeds, GUIDANCE, ETA, STEPS,
                                             logprob_reduce="mean")
    return float((torch.exp(log_probs - traj.log_probs.flatten()) - 1).abs().max())


def output(adapter: DiffusionAdapter) -> torch.Tensor:
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return adapter.noise_pred(latents, torch.tensor([500, 300]), adapter.encode_prompts(PROMPTS), GUIDANCE)


def output_and_grads(adapter: DiffusionAdapter) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    adapter.unet.zero_grad()
    out = output(adapter)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in adapter.unet.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.fixture(scope="module")
def stock(tiny_pipeline_dir: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return output_and_grads(lora_adapter(tiny_pipeline_dir))


def test_channels_last_keeps_outputs_gradients_and_the_ratio(tiny_pipeline_dir: Path, stock: tuple,
                                                             tmp_path: Path) -> None:
    adapter = lora_adapter(tiny_pipeline_dir)
    adapter.set_speed(channels_last=True)
    conv = adapter.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    out, grads = output_and_grads(adapter)
    torch.testing.assert_close(out, stock[0], atol=1e-5, rtol=1e-4)
    assert grads.keys() == stock[1].keys()
    for name in grads:
        torch.testing.assert_close(grads[name], stock[1][name], atol=1e-6, rtol=1e-3)
    assert max_ratio_error(adapter) < 1e-4
    # the LoRA of the convolutions is channels-last too; diffusers saves only contiguous tensors
    saved = adapter.save_lora(tmp_path / "lora")
    reloaded = DiffusionAdapter.from_pretrained(str(tiny_pipeline_dir))
    reloaded.load_lora(saved.parent)
    with torch.no_grad():
        torch.testing.assert_close(output(reloaded), out, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_runs_in_bf16_returns_fp32_and_keeps_the_ratio(tiny_pipeline_dir: Path, stock: tuple) -> None:
    adapter = lora_adapter(tiny_pipeline_dir)
    adapter.set_speed(autocast="bf16")
    seen: list[torch.dtype] = []
    hook = adapter.unet.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    out, grads = output_and_grads(adapter)
    hook.remove()
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert not torch.equal(out, stock[0])  # it did run in bf16
    # bf16 keeps ~3 significant digits; guidance w = 5 scales the error of eps_c - eps_u by w
    assert (out - stock[0]).norm() / stock[0].norm() < 0.1
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads.values())
    # sampling and update both run the same bf16 computation; what differs is batch-size rounding
    assert max_ratio_error(adapter) < 1e-2


def test_a_bad_autocast_value_is_named_before_any_model_loads() -> None:
    with pytest.raises(ValueError, match="autocast"):
        build_config(None, {"autocast": "fp8"})


@pytest.mark.slow
def test_compile_keeps_the_module_its_names_and_its_outputs(tiny_pipeline_dir: Path, stock: tuple) -> None:
    adapter = lora_adapter(tiny_pipeline_dir)
    names = [n for n, _ in adapter.unet.named_parameters()]
    adapter.set_speed(compile_denoiser=True)
    out, grads = output_and_grads(adapter)
    assert [n for n, _ in adapter.unet.named_parameters()] == names  # no _orig_mod. prefix
    torch.testing.assert_close(out, stock[0], atol=1e-4, rtol=1e-3)
    for name in grads:
        torch.testing.assert_close(grads[name], stock[1][name], atol=1e-5, rtol=1e-2)
    with adapter.reference():  # disabling the adapters under compilation gives the base model
        base = adapter.noise_pred(torch.zeros(1, 4, 8, 8), torch.tensor([500]), adapter.encode_prompts(PROMPTS[:1]),
                                  1.0, reference=True)
    assert torch.isfinite(base).all()
