"""SD3 without T5: the 256 zero text tokens folded into one give the stock transformer's output."""

from __future__ import annotations

import pytest
import torch

from dpok.attention import FoldedJointAttnProcessor, fold_text_tokens


def _transformer(qk_norm: str | None = None, dual_attention_layers: tuple[int, ...] = ()):  # noqa: ANN202
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                                 caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=8,
                                 qk_norm=qk_norm, dual_attention_layers=dual_attention_layers).eval()


@pytest.mark.parametrize("variant", ["sd3", "sd3.5"])
def test_folded_tail_equals_the_full_sequence(variant: str) -> None:
    # SD3.5 adds RMS-normed queries and keys and an image-only second attention in some blocks
    model = _transformer(*(("rms_norm", (0,)) if variant == "sd3.5" else ()))
    g = torch.Generator().manual_seed(1)
    x, pooled = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 12, generator=g)
    clip, t = torch.randn(3, 5, 24, generator=g), torch.tensor([10.0, 500.0, 990.0])
    full = torch.cat([clip, torch.zeros(3, 256, 24)], 1)
    folded = torch.cat([clip, torch.zeros(3, 1, 24)], 1)
    with torch.no_grad():
        stock = model(x, encoder_hidden_states=full, pooled_projections=pooled, timestep=t).sample
        before = fold_text_tokens(model, 256, text_tokens=6)
        out = model(x, encoder_hidden_states=folded, pooled_projections=pooled, timestep=t).sample
        # a stock-length call to the folded model is not folded: it still gives the stock result
        stock_again = model(x, encoder_hidden_states=full, pooled_projections=pooled, timestep=t).sample
        # without folding, a single zero token is a different model: the fold is what makes it exact
        model.set_attn_processor(before)
        unfolded = model(x, encoder_hidden_states=folded, pooled_projections=pooled, timestep=t).sample
    torch.testing.assert_close(out, stock, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(stock_again, stock, atol=2e-6, rtol=1e-5)
    assert (unfolded - stock).abs().max() > 1e-3


def test_folded_attention_in_bf16_runs_in_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    # bf16 would round log 256 to 5.53 (252.5 copies of the tail): the folded attention upcasts
    import dpok.attention as attention

    seen: list[tuple[torch.dtype, torch.dtype | None]] = []
    sdpa = attention.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None, **kw):  # noqa: ANN001, ANN202, ANN003
        seen.append((q.dtype, None if attn_mask is None else attn_mask.dtype))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording_sdpa)
    model = _transformer()
    g = torch.Generator().manual_seed(2)
    x, pooled = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 12, generator=g)
    enc, t = torch.cat([torch.randn(2, 5, 24, generator=g), torch.zeros(2, 1, 24)], 1), torch.tensor([100.0, 800.0])
    fold_text_tokens(model, 256, text_tokens=6)
    with torch.no_grad():
        ref = model(x, encoder_hidden_states=enc, pooled_projections=pooled, timestep=t).sample
        out = model.to(torch.bfloat16)(x.bfloat16(), encoder_hidden_states=enc.bfloat16(),
                                        pooled_projections=pooled.bfloat16(), timestep=t).sample
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.05
    assert seen and all(dtypes == (torch.float32, torch.float32) for dtypes in seen)


def test_folded_processor_keeps_gradients_and_rejects_bad_repeats() -> None:
    model = _transformer()
    fold_text_tokens(model, 256, text_tokens=4)
    x = torch.randn(2, 4, 8, 8)
    out = model(x, encoder_hidden_states=torch.randn(2, 4, 24), pooled_projections=torch.randn(2, 12),
                timestep=torch.tensor([5.0, 7.0])).sample
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.transformer_blocks[0].attn.to_q.parameters())
    with pytest.raises(ValueError, match="repeats"):
        FoldedJointAttnProcessor(0, 4)
