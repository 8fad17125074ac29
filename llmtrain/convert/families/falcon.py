"""Falcon: attention and MLP side by side in each layer (one shared LayerNorm in 7B, one each in
40B/180B), multi-query (7B) or grouped-query attention, RoPE, GELU, no linear biases, tied
embeddings. Every fused Q/K/V layout Falcon uses ([all q; k; v] for multi-query, per KV group
[q..., k, v] otherwise) is already Megatron's."""

from __future__ import annotations

from llmtrain.config.schema import ModelConfig
from llmtrain.convert.families import Family, unsupported
from llmtrain.convert.families.llama import hf_rope, rope_fields
from llmtrain.convert.mapping import Rule, Vocabulary, head_counts, linear, norm


def _groups(c) -> int:
    if c.new_decoder_architecture:
        return c.num_kv_heads
    return 1 if c.multi_query else c.num_attention_heads


def _fields(c) -> dict:
    problems: list[str] = []
    if c.alibi:
        problems.append("ALiBi (Falcon-RW)")
    if c.activation != "gelu":
        problems.append(f"activation={c.activation}")
    rope = rope_fields(c, problems)
    unsupported("Falcon", problems)
    parallel = bool(c.parallel_attn or c.new_decoder_architecture)
    groups = _groups(c)
    return {
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.ffn_hidden_size or 4 * c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_query_groups": None if groups == c.num_attention_heads else groups,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "layernorm_epsilon": c.layer_norm_epsilon,
        "add_bias_linear": bool(c.bias),
        "add_qkv_bias": bool(c.bias),
        "parallel_attention_mlp": parallel,
        "parallel_mlp_layernorm": bool(c.new_decoder_architecture
                                       and (c.num_ln_in_parallel_attn or 2) == 2),
        "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
        **rope,
    }


def _hf(m: ModelConfig):
    from transformers import FalconConfig

    heads, groups, _ = head_counts(m)
    # Falcon 7B's layout (one KV head, one norm) or the "new decoder architecture" of 40B/180B.
    new = m.parallel_mlp_layernorm or 1 < groups < heads
    return FalconConfig(
        architectures=["FalconForCausalLM"], vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=heads, num_kv_heads=groups,
        new_decoder_architecture=new, multi_query=groups == 1,
        parallel_attn=m.parallel_attention_mlp,
        num_ln_in_parallel_attn=(2 if m.parallel_mlp_layernorm else 1) if new else None,
        ffn_hidden_size=m.ffn_hidden_size, bias=m.add_bias_linear,
        layer_norm_epsilon=m.layernorm_epsilon, max_position_embeddings=m.max_position_embeddings,
        rope_parameters=hf_rope(m), activation="gelu", alibi=False,
        tie_word_embeddings=m.share_embeddings_and_output_weights)


def _rules(m: ModelConfig) -> list[Rule]:
    layer, hf = "decoder.layers.{i}", "transformer.h.{i}"
    bias = m.add_bias_linear
    result = [Rule("embedding.word_embeddings.weight", ("transformer.word_embeddings.weight",),
                   Vocabulary())]
    if m.parallel_mlp_layernorm:
        result += norm(f"{layer}.input_layernorm", f"{hf}.ln_attn", m)
        result += norm(f"{layer}.pre_mlp_layernorm", f"{hf}.ln_mlp", m)
    else:
        result += norm(f"{layer}.input_layernorm", f"{hf}.input_layernorm", m)
    if not m.parallel_attention_mlp:
        result += norm(f"{layer}.pre_mlp_layernorm", f"{hf}.post_attention_layernorm", m)
    result += linear(f"{layer}.self_attention.linear_qkv", f"{hf}.self_attention.query_key_value",
                     bias)
    result += linear(f"{layer}.self_attention.linear_proj", f"{hf}.self_attention.dense", bias)
    result += linear(f"{layer}.mlp.linear_fc1", f"{hf}.mlp.dense_h_to_4h", bias)
    result += linear(f"{layer}.mlp.linear_fc2", f"{hf}.mlp.dense_4h_to_h", bias)
    result += norm("decoder.final_layernorm", "transformer.ln_f", m)
    if not m.share_embeddings_and_output_weights:
        result.append(Rule("output_layer.weight", ("lm_head.weight",), Vocabulary()))
    return result


FALCON = Family(name="falcon", architecture="FalconForCausalLM", model_type="falcon",
                base_prefix="transformer.", layers="transformer.h", from_hf=_fields,
                hf_config=_hf, rules=_rules,
                defaults=dict(normalization="LayerNorm", activation="gelu"),
                sizes=("falcon_7b", "falcon_40b"))
