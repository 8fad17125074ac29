"""Llama 2/3/3.1/3.2, Mistral and Qwen2/2.5: pre-norm RMSNorm decoders with RoPE, GQA and SwiGLU.

They differ only in config details: Llama 3.1/3.2's RoPE frequency scaling, Mistral's sliding
window, Qwen2's Q/K/V biases, and tied embeddings on the small sizes.
"""

from __future__ import annotations

from typing import Callable

from llmtrain.config.layers import moe_layers
from llmtrain.config.schema import ModelConfig
from llmtrain.convert.families import Family, unsupported
from llmtrain.convert.families.moe import PROJECTIONS, Experts
from llmtrain.convert.mapping import (
    QKV,
    Rule,
    Vocabulary,
    gated_mlp,
    head_counts,
    linear,
    norm,
    on_layers,
)

# Llama 3.1's RoPE scaling as Megatron-Core implements it (only the factor is configurable).
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}

# RoPE scalings these families do not convert, and why.
ROPE_MISSING = {
    "yarn": "the Llama-layout mapping does not carry YaRN yet (Megatron-Core's GPTModel has it, "
            "attention factor included: the gpt_oss and deepseek families convert it)",
    "dynamic": "Megatron-Core has no RoPE whose base grows with the sequence length (dynamic "
               "NTK); to keep the positions the model was trained on, set rope_type to default "
               "in config.json",
    "longrope": "Megatron-Core has no per-channel LongRoPE factors",
}


def rope_fields(c, problems: list[str], partial: bool = False) -> dict:
    """RoPE base, scaling and (where the family has it, `partial`) the fraction of channels
    rotated, from a Hugging Face config (transformers' `rope_parameters`)."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", 10000.0))
    if theta != int(theta):
        problems.append(f"a fractional RoPE base {theta}")
    fields = {"position_embedding_type": "rope", "rotary_base": int(theta)}
    kind = rope.get("rope_type", "default")
    if kind == "llama3":
        for key, value in LLAMA3_ROPE.items():
            if float(rope.get(key, value)) != value:
                problems.append(f"Llama 3 RoPE scaling with {key}={rope.get(key)} (Megatron-Core "
                                f"has {value} built in)")
        fields.update(rope_scaling=True, rope_scaling_factor=float(rope["factor"]))
    elif kind == "linear":
        fields["seq_len_interpolation_factor"] = float(rope["factor"])
    elif kind in ROPE_MISSING:
        problems.append(f"RoPE scaling of type {kind!r}: {ROPE_MISSING[kind]}")
    elif kind != "default":
        problems.append(f"RoPE scaling of type {kind!r} (default, linear and llama3 convert)")
    percent = float(rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
                    or 1.0)
    if partial:
        fields["rotary_percent"] = percent
    elif percent != 1.0:
        problems.append("partial rotary embeddings (partial_rotary_factor)")
    return fields


def hf_rope(m: ModelConfig) -> dict:
    rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    if m.rotary_percent != 1.0:
        rope["partial_rotary_factor"] = m.rotary_percent
    if m.rope_scaling:
        rope.update(rope_type="llama3", factor=m.rope_scaling_factor, **LLAMA3_ROPE)
    elif m.seq_len_interpolation_factor:
        rope.update(rope_type="linear", factor=m.seq_len_interpolation_factor)
    return rope


# The fields these decoders share (defaults of their families).
DECODER = dict(normalization="RMSNorm", activation="swiglu", position_embedding_type="rope")


def decoder_fields(c, problems: list[str], partial_rotary: bool = False) -> dict:
    """The ModelConfig fields a Hugging Face config of these families sets."""
    heads, kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    if c.hidden_act != "silu":
        problems.append(f"hidden_act={c.hidden_act} (these families use silu, SwiGLU)")
    return {
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size,
        "num_attention_heads": heads,
        "num_query_groups": None if kv == heads else kv,
        "kv_channels": None if head_dim * heads == c.hidden_size else head_dim,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "layernorm_epsilon": c.rms_norm_eps,
        "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
        **rope_fields(c, problems, partial_rotary),
    }


def _llama_fields(c) -> dict:
    problems: list[str] = []
    fields = decoder_fields(c, problems)
    attention_bias, mlp_bias = bool(c.attention_bias), bool(getattr(c, "mlp_bias", False))
    if attention_bias != mlp_bias:
        problems.append("biases on attention but not MLP projections or the reverse "
                        "(Megatron's add_bias_linear covers both)")
    fields["add_bias_linear"] = attention_bias and mlp_bias
    unsupported("Llama", problems)
    return fields


def _mistral_fields(c) -> dict:
    problems: list[str] = []
    fields = decoder_fields(c, problems)
    if c.sliding_window:
        fields["window_size"] = [c.sliding_window - 1, 0]
    unsupported("Mistral", problems)
    return fields


def _qwen2_fields(c) -> dict:
    problems: list[str] = []
    fields = decoder_fields(c, problems)
    if c.use_sliding_window:
        problems.append("sliding-window attention on some layers (use_sliding_window)")
    unsupported("Qwen2", problems)
    return fields


def common_hf(m: ModelConfig, architecture: str) -> dict:
    heads, groups, size = head_counts(m)
    return dict(
        architectures=[architecture], vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=heads, num_key_value_heads=groups, head_dim=size,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.layernorm_epsilon,
        hidden_act="silu", tie_word_embeddings=m.share_embeddings_and_output_weights,
        rope_parameters=hf_rope(m))


def _llama_hf(m: ModelConfig):
    from transformers import LlamaConfig

    return LlamaConfig(**common_hf(m, "LlamaForCausalLM"), attention_bias=m.add_bias_linear,
                       mlp_bias=m.add_bias_linear)


def _mistral_hf(m: ModelConfig):
    from transformers import MistralConfig

    window = m.window_size[0] + 1 if m.window_size else None
    return MistralConfig(**common_hf(m, "MistralForCausalLM"), sliding_window=window)


def _qwen2_hf(m: ModelConfig):
    from transformers import Qwen2Config

    return Qwen2Config(**common_hf(m, "Qwen2ForCausalLM"), use_sliding_window=False)


def rules(m: ModelConfig, fused_gate_up: bool = False, experts: Experts | None = None,
          attention: Callable[[ModelConfig, str, str], list[Rule]] | None = None) -> list[Rule]:
    """Llama's names; `fused_gate_up`: one [gate; up] projection (GLM), Megatron's own layout;
    `experts`: a mixture-of-experts block in place of the MLP, named the family's way;
    `attention`: the rules of (Megatron's, Hugging Face's) attention module in place of the
    Q/K/V ones (DeepSeek's multi-latent attention)."""
    layer, hf = "decoder.layers.{i}", "model.layers.{i}"
    result = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",),
                   Vocabulary())]
    result += norm(f"{layer}.input_layernorm", f"{hf}.input_layernorm", m)
    result += (attention or qkv_attention)(m, f"{layer}.self_attention", f"{hf}.self_attn")
    result += norm(f"{layer}.pre_mlp_layernorm", f"{hf}.post_attention_layernorm", m)
    if experts is not None:  # the MoE layers' experts, the dense layers' MLP (moe_layer_freq)
        moe = moe_layers(m)
        result += on_layers(experts.rules(m, layer, hf), tuple(i for i, e in enumerate(moe) if e))
        result += on_layers(gated_mlp(f"{layer}.mlp", f"{hf}.mlp", PROJECTIONS, m.add_bias_linear),
                            tuple(i for i, e in enumerate(moe) if not e))
    elif fused_gate_up:
        result.append(Rule(f"{layer}.mlp.linear_fc1.weight", (f"{hf}.mlp.gate_up_proj.weight",)))
        result += linear(f"{layer}.mlp.linear_fc2", f"{hf}.mlp.down_proj", m.add_bias_linear)
    else:
        result += gated_mlp(f"{layer}.mlp", f"{hf}.mlp", PROJECTIONS, m.add_bias_linear)
    result += norm("decoder.final_layernorm", "model.norm", m)
    if not m.share_embeddings_and_output_weights:
        result.append(Rule("output_layer.weight", ("lm_head.weight",), Vocabulary()))
    return result


def qkv_attention(m: ModelConfig, mcore: str, hf: str) -> list[Rule]:
    """Separate Q, K, V projections into Megatron's fused one, and the output projection."""
    result = [Rule(f"{mcore}.linear_qkv.{kind}", tuple(f"{hf}.{p}_proj.{kind}" for p in "qkv"),
                   QKV())
              for kind in (("weight", "bias") if m.add_qkv_bias or m.add_bias_linear
                           else ("weight",))]
    return result + linear(f"{mcore}.linear_proj", f"{hf}.o_proj", m.add_bias_linear)


# What every family of this layout shares.
SHARED = dict(base_prefix="model.", layers="model.layers", rules=rules,
              ignored=(r"rotary_emb\.inv_freq$",))
LLAMA = Family(name="llama", architecture="LlamaForCausalLM", model_type="llama",
               from_hf=_llama_fields, hf_config=_llama_hf, defaults=DECODER,
               sizes=("llama2_7b", "llama2_13b", "llama2_70b", "llama3_8b", "llama3_70b",
                      "llama3_1_8b", "llama3_1_70b", "llama3_2_1b", "llama3_2_3b"), **SHARED)
MISTRAL = Family(name="mistral", architecture="MistralForCausalLM", model_type="mistral",
                 from_hf=_mistral_fields, hf_config=_mistral_hf, defaults=DECODER,
                 sizes=("mistral_7b", "mistral_7b_v0_3"), **SHARED)
QWEN2 = Family(name="qwen2", architecture="Qwen2ForCausalLM", model_type="qwen2",
               from_hf=_qwen2_fields, hf_config=_qwen2_hf,
               defaults=dict(DECODER, add_qkv_bias=True),
               sizes=("qwen2_0_5b", "qwen2_1_5b", "qwen2_7b", "qwen2_5_0_5b", "qwen2_5_1_5b",
                      "qwen2_5_3b", "qwen2_5_7b", "qwen2_5_14b", "qwen2_5_32b", "qwen2_5_72b"),
               **SHARED)
