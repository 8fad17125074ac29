"""Bloom: ALiBi instead of position embeddings, a LayerNorm on the word embeddings, LayerNorm,
GELU (tanh approximation), biases everywhere, tied embeddings. Its fused Q/K/V is laid out per
head as [q, k, v], which is Megatron's layout for multi-head attention."""

from __future__ import annotations

from llmtrain.config.schema import ModelConfig
from llmtrain.convert.families import Family, unsupported
from llmtrain.convert.mapping import Rule, Vocabulary, linear, norm

# Bloom has no position limit of its own; it was trained on 2048-token sequences.
TRAINED_LENGTH = 2048


def _fields(c) -> dict:
    problems = []
    if c.apply_residual_connection_post_layernorm:
        problems.append("apply_residual_connection_post_layernorm=true")
    unsupported("Bloom", problems)
    return {
        "num_layers": c.n_layer,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": 4 * c.hidden_size,
        "num_attention_heads": c.n_head,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": TRAINED_LENGTH,
        "layernorm_epsilon": c.layer_norm_epsilon,
        "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
    }


def _hf(m: ModelConfig):
    from transformers import BloomConfig

    return BloomConfig(architectures=["BloomForCausalLM"], vocab_size=m.vocab_size,
                       hidden_size=m.hidden_size, n_layer=m.num_layers,
                       n_head=m.num_attention_heads, layer_norm_epsilon=m.layernorm_epsilon,
                       tie_word_embeddings=m.share_embeddings_and_output_weights)


def _rules(m: ModelConfig) -> list[Rule]:
    layer, hf = "decoder.layers.{i}", "transformer.h.{i}"
    result = [Rule("embedding.word_embeddings.weight", ("transformer.word_embeddings.weight",),
                   Vocabulary())]
    result += norm("embedding.layernorm", "transformer.word_embeddings_layernorm", m)
    result += norm(f"{layer}.input_layernorm", f"{hf}.input_layernorm", m)
    result += linear(f"{layer}.self_attention.linear_qkv", f"{hf}.self_attention.query_key_value",
                     True)
    result += linear(f"{layer}.self_attention.linear_proj", f"{hf}.self_attention.dense", True)
    result += norm(f"{layer}.pre_mlp_layernorm", f"{hf}.post_attention_layernorm", m)
    result += linear(f"{layer}.mlp.linear_fc1", f"{hf}.mlp.dense_h_to_4h", True)
    result += linear(f"{layer}.mlp.linear_fc2", f"{hf}.mlp.dense_4h_to_h", True)
    result += norm("decoder.final_layernorm", "transformer.ln_f", m)
    if not m.share_embeddings_and_output_weights:
        result.append(Rule("output_layer.weight", ("lm_head.weight",), Vocabulary()))
    return result


BLOOM = Family(name="bloom", architecture="BloomForCausalLM", model_type="bloom",
               base_prefix="transformer.", layers="transformer.h", from_hf=_fields,
               hf_config=_hf, rules=_rules,
               defaults=dict(normalization="LayerNorm", activation="gelu_tanh",
                             add_bias_linear=True, add_qkv_bias=True,
                             position_embedding_type="alibi", embedding_layernorm=True),
               sizes=("bloom_560m", "bloom_1b7", "bloom_7b1", "bloom_176b"))
