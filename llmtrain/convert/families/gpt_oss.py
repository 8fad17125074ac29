"""gpt-oss (OpenAI's open-weight 20B and 120B): a pre-norm decoder whose every MLP is a mixture of
experts, with what sets it apart from Mixtral all carried by Megatron-Core's own fields:

- attention sinks, a learned logit per head in the softmax's denominator (`self_attn.sinks`):
  `softmax_type: learnable`, the core attention's `softmax_offset`;
- sliding-window attention (128 tokens) on every other layer, from the first: `window_size`
  with `window_attn_skip_freq: 2` (or one flag per layer for other `layer_types`);
- YaRN RoPE with its ramp's ends unrounded (`truncate: false`): Megatron-Core's GPTModel YaRN,
  attention factor included (`yarn_correction_range_round_to_int: false`);
- biases on the Q/K/V and output projections, the router and every expert (`add_bias_linear`);
- the experts' clamped gated unit, (clamp(up, -7, 7) + 1) * g * sigmoid(1.702 g) with
  g = min(gate, 7): Megatron-Core's quick_geglu with `glu_linear_offset: 1.0` and
  `activation_func_clamp_value: 7.0`; Hugging Face interleaves gate and up columns in its
  fused `gate_up_proj`, Megatron stacks them ([gate; up]);
- routing: the top k router logits, then a softmax over them (`moe_router_pre_softmax: false`).

The experts of a layer are stored as stacked tensors ([experts, in, out], the transpose of
Megatron's linear layers), each Megatron expert reading its own slice; the published
checkpoints store them in MXFP4, dequantized to bf16 as they are read (exactly as transformers
dequantizes them). The way back writes them dequantized.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmtrain.config.layers import window_layers
from llmtrain.config.schema import ModelConfig
from llmtrain.convert.families import Family, unsupported
from llmtrain.convert.families.deepseek import hf_rope, rope_fields
from llmtrain.convert.families.llama import DECODER, SHARED, qkv_attention, rules
from llmtrain.convert.families.moe import DEFAULTS
from llmtrain.convert.mapping import Copy, Deinterleaved, ExpertSlice, Rule, Transposed

# Megatron-Core's quick_gelu has this sigmoid gain built in.
QUICK_GELU_ALPHA = 1.702
FULL, SLIDING = "full_attention", "sliding_attention"


def _window_fields(c, problems: list[str]) -> dict:
    """The window and the layers that have it, from `layer_types`."""
    types = list(c.layer_types or [SLIDING if i % 2 == 0 else FULL
                                   for i in range(c.num_hidden_layers)])
    if set(types) - {FULL, SLIDING}:
        problems.append(f"layer_types other than {FULL} and {SLIDING}: "
                        f"{sorted(set(types) - {FULL, SLIDING})}")
        return {}
    if SLIDING not in types or not c.sliding_window:
        return {}
    alternating = [SLIDING if i % 2 == 0 else FULL for i in range(len(types))]
    return {"window_size": [c.sliding_window - 1, 0],
            "window_attn_skip_freq": (None if FULL not in types else 2 if types == alternating
                                      else [int(t == SLIDING) for t in types])}


def _layer_types(m: ModelConfig) -> list[str]:
    return [SLIDING if window else FULL for window in window_layers(m)]


def _fields(c) -> dict:
    problems: list[str] = []
    # The published experts' MXFP4 blocks and scales are dequantized as they are read
    # (llmtrain.convert.hf_files); other formats are not.
    method = dict(getattr(c, "quantization_config", None) or {}).get("quant_method", "mxfp4")
    if method != "mxfp4":
        problems.append(f"weights quantized with {method} (quantization_config; MXFP4 experts "
                        f"are dequantized on import): dequantize them first (transformers: "
                        f"from_pretrained, then save_pretrained), then convert that folder")
    if not c.attention_bias:
        problems.append("attention_bias=false (the experts and the router have biases; "
                        "Megatron's add_bias_linear covers every linear layer)")
    alpha = float(getattr(c, "swiglu_alpha", QUICK_GELU_ALPHA))
    if alpha != QUICK_GELU_ALPHA:
        problems.append(f"swiglu_alpha={alpha} (Megatron-Core's quick_gelu has "
                        f"{QUICK_GELU_ALPHA} built in)")
    heads, kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    head_dim = c.head_dim or c.hidden_size // heads
    fields = {
        "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size, "num_attention_heads": heads,
        "num_query_groups": None if kv == heads else kv,
        "kv_channels": None if head_dim * heads == c.hidden_size else head_dim,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
        "layernorm_epsilon": c.rms_norm_eps,
        "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
        "activation_func_clamp_value": float(getattr(c, "swiglu_limit", 7.0)),
        "num_moe_experts": c.num_local_experts, "moe_router_topk": c.num_experts_per_tok,
        "moe_aux_loss_coeff": c.router_aux_loss_coef,
        **_window_fields(c, problems), **rope_fields(c, problems, unrounded=True)}
    unsupported("gpt-oss", problems)
    return fields


def _hf(m: ModelConfig):
    from transformers import GptOssConfig

    heads = m.num_attention_heads
    return GptOssConfig(
        architectures=["GptOssForCausalLM"], vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=heads, num_key_value_heads=m.num_query_groups or heads,
        head_dim=m.kv_channels or m.hidden_size // heads,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.layernorm_epsilon,
        tie_word_embeddings=m.share_embeddings_and_output_weights, rope_parameters=hf_rope(m),
        sliding_window=m.window_size[0] + 1 if m.window_size else None,
        layer_types=_layer_types(m), num_local_experts=m.num_moe_experts,
        num_experts_per_tok=m.moe_router_topk, router_aux_loss_coef=m.moe_aux_loss_coeff,
        swiglu_alpha=QUICK_GELU_ALPHA, swiglu_limit=m.activation_func_clamp_value,
        attention_bias=True)


@dataclass(frozen=True)
class StackedExperts:
    """gpt-oss's MoE block (`mlp`): the router (`router.weight`, `router.bias`) and each
    layer's experts in four stacked tensors (`experts.gate_up_proj` [experts, hidden, 2 x ffn]
    with gate and up interleaved, `down_proj` [experts, ffn, hidden], and their biases)."""

    def rules(self, m: ModelConfig, layer: str, hf: str) -> list[Rule]:
        expert, stacked = f"{layer}.mlp.experts.local_experts.{{e}}", f"{hf}.mlp.experts"
        return [
            Rule(f"{layer}.mlp.router.weight", (f"{hf}.mlp.router.weight",)),
            Rule(f"{layer}.mlp.router.bias", (f"{hf}.mlp.router.bias",)),
            Rule(f"{expert}.linear_fc1.weight", (f"{stacked}.gate_up_proj",),
                 ExpertSlice(Transposed(Deinterleaved()))),
            Rule(f"{expert}.linear_fc1.bias", (f"{stacked}.gate_up_proj_bias",),
                 ExpertSlice(Deinterleaved())),
            Rule(f"{expert}.linear_fc2.weight", (f"{stacked}.down_proj",),
                 ExpertSlice(Transposed())),
            Rule(f"{expert}.linear_fc2.bias", (f"{stacked}.down_proj_bias",), ExpertSlice(Copy())),
        ]


def _attention(m: ModelConfig, mcore: str, hf: str) -> list[Rule]:
    """Llama's attention with biases, and the sinks."""
    return qkv_attention(m, mcore, hf) + [
        Rule(f"{mcore}.core_attention.softmax_offset", (f"{hf}.sinks",))]


def _rules(m: ModelConfig) -> list[Rule]:
    return rules(m, experts=StackedExperts(), attention=_attention)


GPT_OSS = Family(
    name="gpt_oss", architecture="GptOssForCausalLM", model_type="gpt_oss",
    from_hf=_fields, hf_config=_hf,
    defaults=dict(DECODER, **DEFAULTS, activation="quick_geglu", glu_linear_offset=1.0,
                  add_bias_linear=True, softmax_type="learnable", moe_router_pre_softmax=False),
    sizes=("gpt_oss_20b", "gpt_oss_120b"), **dict(SHARED, rules=_rules))
