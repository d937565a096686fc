"""SD3's joint attention with a run of identical text tokens folded into one.

Stable Diffusion 3 without its T5 encoder still appends ``max_sequence_length`` (256 by default)
text tokens, all zero vectors, after the CLIP tokens. SD3 has no positional embedding on text
tokens and treats every token alike (embedder, norms, feed-forward act on each token alone), so
those tokens stay identical through every block, and in attention ``n`` identical keys with
identical values act exactly as one key whose logit is raised by ``log n``:

    sum_j exp(q.k_j) v_j  with k_j = k, v_j = v for n of the j   ==   ... + exp(q.k + log n) v

Encoding the prompt with ``max_sequence_length=1`` and running the transformer with
:class:`FoldedJointAttnProcessor` (``repeats=256``) therefore gives the stock pipeline's output
(up to float rounding) with L + 1 instead of L + 256 text tokens (L CLIP tokens: 77 for SD3, 16
for the embedded model, where the transformer's work falls 4x). Only the image tokens' outputs
leave the model. The processor folds only sequences of the length it was built for, so the same
transformer called the stock way (all 256 tokens) still computes the stock result.
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
    tokens, the last of which is the folded one when M == ``text_tokens``. Returns (B, N, C) and
    (B, M, C) like diffusers' ``JointAttnProcessor2_0``; without text tokens (SD3.5's second,
    image-only attention) it is plain self-attention. In fp16/bf16 the folded attention runs in
    fp32: bf16 would round log 256 to 5.53 (252.5 copies); the float mask also rules out the
    flash kernel on GPUs, which is why the adapter folds only in fp32.
    """

    def __init__(self, repeats: int, text_tokens: int) -> None:
        if repeats < 1 or text_tokens < 1:
            raise ValueError(f"repeats and text_tokens must be >= 1, got {repeats} and {text_tokens}")
        self.repeats = repeats
        self.text_tokens = text_tokens

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
            if encoder_hidden_states.shape[1] == self.text_tokens:
                # log(repeats) on the folded key's logit = that key counted `repeats` times in the softmax
                bias = torch.zeros(1, 1, 1, k.shape[2], dtype=torch.float32, device=q.device)
                bias[..., -1] = math.log(self.repeats)
        dtype = q.dtype
        if bias is not None and dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).flatten(2).to(dtype)
        image = attn.to_out[1](attn.to_out[0](out[:, :n_image]))
        if encoder_hidden_states is None:
            return image
        text = out[:, n_image:]
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text


def fold_text_tokens(transformer: Any, repeats: int, text_tokens: int) -> dict[str, Any]:  # noqa: ANN401
    """Give every attention of an SD3 transformer the folded processor: text sequences of
    ``text_tokens`` tokens (the CLIP tokens and one zero token) stand for ``text_tokens - 1 +
    repeats`` (``repeats`` = the T5 length). Any custom processor (e.g. an IP-Adapter's) is replaced
    too. Returns the processors it replaced, for ``transformer.set_attn_processor`` to put back."""
    before = dict(transformer.attn_processors)
    transformer.set_attn_processor(FoldedJointAttnProcessor(repeats, text_tokens))
    return before
