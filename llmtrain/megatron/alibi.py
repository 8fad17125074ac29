"""ALiBi (Press et al., 2022): attention biased by key distance instead of position embeddings.

Megatron-Core has no ALiBi. Bloom needs it, so this core attention adds the bias to Megatron's
own dot-product attention scores just before the masked softmax; the layer spec puts it in place
of the usual core attention (`llmtrain.megatron.specs`), for the local and the Transformer Engine
layers alike. Megatron itself is left as it is.

The bias of head h for query i and key j is slope_h * j: softmax is invariant to a shift per row,
so this equals slope_h * (j - i), the distance penalty of the paper, under the causal mask.
"""

from __future__ import annotations

import math

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """Per-head slopes: a geometric sequence from 2^(-8/n), interleaved with the next power of two's
    when n is not one (as Bloom and the paper's reference code compute them, in float32)."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != num_heads:
        extra_base = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        remaining = min(closest, num_heads - closest)
        extra = torch.pow(extra_base, torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.int32))
        slopes = torch.cat([slopes, extra])
    return slopes


class _BiasedSoftmax(torch.nn.Module):
    """Megatron's scale-mask-softmax with the ALiBi bias added to its input scores."""

    def __init__(self, softmax: torch.nn.Module, slopes: torch.Tensor):
        super().__init__()
        self.softmax = softmax
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, scores: torch.Tensor, mask, *args):
        # scores: [batch, heads of this rank, queries, keys]
        keys = torch.arange(scores.size(-1), device=scores.device, dtype=torch.float32)
        bias = (self.slopes.to(scores.device)[:, None, None] * keys).to(scores.dtype)
        return self.softmax(scores + bias, mask, *args)


class AlibiDotProductAttention(DotProductAttention):
    """Megatron's DotProductAttention plus the ALiBi bias of this tensor-parallel rank's heads."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        heads = self.num_attention_heads_per_partition
        first = self.tp_group.rank() * heads
        slopes = alibi_slopes(config.num_attention_heads)[first:first + heads]
        self.scale_mask_softmax = _BiasedSoftmax(self.scale_mask_softmax, slopes)
