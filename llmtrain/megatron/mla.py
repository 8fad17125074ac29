"""Multi-latent attention (DeepSeek) where Megatron-Core 0.19.2 falls short; the layer spec
(`llmtrain.megatron.specs`) puts these modules in place of its own.

- Core attention on the local layers (the CPU): multi-latent attention gives it a key head size
  (`k_channels`: the query's and key's channels, position-free and rotated) other than the
  value's (`v_channels`), which only Transformer Engine's attention takes. Megatron's own
  dot-product attention already computes with whatever head sizes its inputs have and only sizes
  its output by kv_channels: `LatentDotProductAttention` sizes it by the value heads.
- A query without a latent (q_lora_rank null, DeepSeek-V2-Lite): with qk_layernorm, Megatron-Core
  fuses a norm into the query projection, which DeepSeek does not have (its latent norms are
  the keys' and values' only): `DirectQueryAttention` keeps the projection plain.
"""

from __future__ import annotations

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.multi_latent_attention import MLASelfAttention


class LatentDotProductAttention(DotProductAttention):
    """Megatron's DotProductAttention with separate key and value head sizes."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type, k_channels=None,
                 v_channels=None, **kwargs):
        super().__init__(config, layer_number, attn_mask_type, attention_type, **kwargs)
        if v_channels is not None:  # (Megatron's Attention first builds one without them)
            self.hidden_size_per_partition = self.num_attention_heads_per_partition * v_channels


class DirectQueryAttention(MLASelfAttention):
    """Multi-latent attention whose query comes straight from the (normalised) hidden state,
    while the keys' and values' latent has its norm (a module, or fused into the up projection
    by Transformer Engine's spec)."""

    def _resolve_qk_norm_config(self, submodules) -> dict:
        return dict(linear_q_proj=submodules.linear_q_proj, linear_q_up_proj=IdentityOp,
                    linear_kv_up_proj=submodules.linear_kv_up_proj, q_layernorm=IdentityOp,
                    kv_layernorm=submodules.kv_layernorm)
