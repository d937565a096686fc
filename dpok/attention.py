"""SD3's joint attention with a run of identical text tokens folded into one.

Stable Diffusion 3 without its T5 encoder still appends ``max_sequence_length`` (256 by default)
text tokens, all zero vectors, after the CLIP tokens. SD3 has no positional embedding on text
tokens and treats every token alike, so those tokens stay identical through every block, and in
attention ``n`` identical keys with identical values act exactly as one key whose logit is raised
by ``log n``:

    sum_j exp(q.k_j) v_j  with k_j = k, v_j = v for n of the j   ==   ... + exp(q.k + log n) v

Encoding the prompt with ``max_sequence_length=1`` and running the transformer with
:class:`FoldedJointAttnProcessor` (``repeats=256``) therefore gives the stock pipeline's output
(up to float rounding) at 17 instead of 272 text tokens per CLIP slot pair: 4-16x less transformer
work on small models. The image tokens' outputs are the only ones the model returns.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F


class FoldedJointAttnProcessor:
    """Joint (image + text) attention of an SD3 block in which the last text token stands for
    ``repeats`` identical tokens.

    Shapes: ``hidden_states`` (B, N, C) image tokens, ``encoder_hidden_states`` (B, M, C) text
    tokens, the last of which is the folded one. Returns (B, N, C) and (B, M, C) like diffusers'
    ``JointAttnProcessor2_0``; without text tokens (SD3.5's second, image-only attention) it is
    plain self-attention.
    """

    def __init__(self, repeats: int) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.repeats = repeats

    def _heads(self, attn: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN401 - diffusers Attention
        return x.unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, heads, tokens, head_dim)

    def __call__(self, attn: Any, hidden_states: torch.Tensor,  # noqa: ANN401 - diffusers Attention
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN401
        n_image = hidden_states.shape[1]
        q, k, v = (self._heads(attn, proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        bias = None
        if encoder_hidden_states is not None:
            cq, ck, cv = (self._heads(attn, proj(encoder_hidden_states))
                          for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            # log(repeats) on the folded key's logit = that key counted `repeats` times in the softmax
            bias = torch.zeros(1, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
            bias[..., -1] = math.log(self.repeats)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :n_image]))
        if encoder_hidden_states is None:
            return image
        text = out[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


def fold_text_tokens(transformer: Any, repeats: int) -> dict[str, Any]:  # noqa: ANN401 - diffusers model
    """Give every attention of an SD3 transformer the folded processor (``repeats`` = the T5 length
    the prompt embeddings stand for; the embeddings must then end with one zero token). Returns the
    processors it replaced, for ``transformer.set_attn_processor`` to put back."""
    before = dict(transformer.attn_processors)
    transformer.set_attn_processor(FoldedJointAttnProcessor(repeats))
    return before
