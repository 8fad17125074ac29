"""Qwen3 dense (0.6B to 32B): Qwen2's decoder without Q/K/V biases and with an RMSNorm over each
query and key head before RoPE (Megatron-Core's qk_layernorm), a head size of 128 whatever the
hidden size (kv_channels), and tied embeddings on the sizes up to 4B."""

from __future__ import annotations

from llmtrain.config.schema import ModelConfig
from llmtrain.convert.families import Family, unsupported
from llmtrain.convert.families.llama import DECODER, SHARED, common_hf, decoder_fields, rules
from llmtrain.convert.families.moe import Experts
from llmtrain.convert.mapping import Rule


def qwen3_fields(c, problems: list[str]) -> dict:
    """The fields of a Qwen3 config (dense or MoE), the features they lack in `problems`."""
    fields = decoder_fields(c, problems)
    if c.attention_bias:
        problems.append("attention_bias=true (biases on Q/K/V and the output projection)")
    if c.use_sliding_window:
        problems.append("sliding-window attention on some layers (use_sliding_window)")
    return fields


def _fields(c) -> dict:
    problems: list[str] = []
    fields = qwen3_fields(c, problems)
    unsupported("Qwen3", problems)
    return fields


def _hf(m: ModelConfig):
    from transformers import Qwen3Config

    return Qwen3Config(**common_hf(m, "Qwen3ForCausalLM"), attention_bias=False,
                       use_sliding_window=False)


def qk_norm_rules(m: ModelConfig, experts: Experts | None = None) -> list[Rule]:
    """Llama's rules (with a MoE block: Qwen3-MoE) and the Q/K norms."""
    layer, attention = "decoder.layers.{i}.self_attention", "model.layers.{i}.self_attn"
    return rules(m, experts=experts) + [
        Rule(f"{layer}.q_layernorm.weight", (f"{attention}.q_norm.weight",)),
        Rule(f"{layer}.k_layernorm.weight", (f"{attention}.k_norm.weight",))]


QWEN3 = Family(
    name="qwen3", architecture="Qwen3ForCausalLM", model_type="qwen3", from_hf=_fields,
    hf_config=_hf, defaults=dict(DECODER, add_qkv_bias=False, qk_layernorm=True),
    sizes=("qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b"),
    # The tied sizes' Hub checkpoints (0.6B, 1.7B) also store the output layer: the embedding.
    **dict(SHARED, rules=qk_norm_rules, ignored=(*SHARED["ignored"], r"^lm_head\.weight$")))
