"""GPT-2: learned absolute positions, LayerNorm, GELU (tanh approximation), biases everywhere,
tied embeddings. Its Conv1D layers store weights as [in, out] and its attention projection as one
[Q; K; V] tensor."""

from __future__ import annotations

from llmtrain.config.schema import ModelConfig
from llmtrain.convert.families import Family, unsupported
from llmtrain.convert.mapping import Rule, StackedQKV, Transposed, Vocabulary, linear, norm

ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
               "relu": "relu"}


def _fields(c) -> dict:
    problems = []
    if c.activation_function not in ACTIVATIONS:
        problems.append(f"activation_function={c.activation_function}")
    if c.scale_attn_by_inverse_layer_idx:
        problems.append("scale_attn_by_inverse_layer_idx=true")
    if not c.scale_attn_weights:
        problems.append("scale_attn_weights=false")
    unsupported("GPT-2", problems)
    return {
        "num_layers": c.n_layer,
        "hidden_size": c.n_embd,
        "ffn_hidden_size": c.n_inner or 4 * c.n_embd,
        "num_attention_heads": c.n_head,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.n_positions,
        "layernorm_epsilon": c.layer_norm_epsilon,
        "activation": ACTIVATIONS[c.activation_function],
        "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
    }


def _hf(m: ModelConfig):
    from transformers import GPT2Config

    activation = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}.get(m.activation,
                                                                             m.activation)
    return GPT2Config(architectures=["GPT2LMHeadModel"], vocab_size=m.vocab_size,
                      n_positions=m.max_position_embeddings, n_embd=m.hidden_size,
                      n_layer=m.num_layers, n_head=m.num_attention_heads,
                      n_inner=m.ffn_hidden_size, activation_function=activation,
                      layer_norm_epsilon=m.layernorm_epsilon,
                      tie_word_embeddings=m.share_embeddings_and_output_weights)


def _rules(m: ModelConfig) -> list[Rule]:
    layer, hf = "decoder.layers.{i}", "transformer.h.{i}"
    result = [Rule("embedding.word_embeddings.weight", ("transformer.wte.weight",), Vocabulary()),
              Rule("embedding.position_embeddings.weight", ("transformer.wpe.weight",))]
    result += norm(f"{layer}.input_layernorm", f"{hf}.ln_1", m)
    result += linear(f"{layer}.self_attention.linear_qkv", f"{hf}.attn.c_attn", True,
                     Transposed(StackedQKV()))
    result += linear(f"{layer}.self_attention.linear_proj", f"{hf}.attn.c_proj", True,
                     Transposed())
    result += norm(f"{layer}.pre_mlp_layernorm", f"{hf}.ln_2", m)
    result += linear(f"{layer}.mlp.linear_fc1", f"{hf}.mlp.c_fc", True, Transposed())
    result += linear(f"{layer}.mlp.linear_fc2", f"{hf}.mlp.c_proj", True, Transposed())
    result += norm("decoder.final_layernorm", "transformer.ln_f", m)
    if not m.share_embeddings_and_output_weights:
        result.append(Rule("output_layer.weight", ("lm_head.weight",), Vocabulary()))
    return result


GPT2 = Family(name="gpt2", architecture="GPT2LMHeadModel", model_type="gpt2",
              base_prefix="transformer.", layers="transformer.h", from_hf=_fields,
              hf_config=_hf, rules=_rules, ignored=(r"\.attn\.(bias|masked_bias)$",),
              defaults=dict(normalization="LayerNorm", add_bias_linear=True,
                            add_qkv_bias=True, position_embedding_type="learned_absolute"),
              sizes=("gpt2", "gpt2_345m", "gpt2_large", "gpt2_xl"))
