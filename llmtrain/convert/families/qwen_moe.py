"""Qwen's mixtures of experts: Qwen1.5/Qwen2-MoE (Qwen2's decoder, 60 or 64 routed experts and a
shared expert behind a sigmoid gate) and Qwen3-MoE (Qwen3's decoder with its Q/K norms, 128
routed experts, no shared one). Both keep Llama's projection names for each expert."""

from __future__ import annotations

from llmtrain.config.schema import ModelConfig
from llmtrain.convert.families import Family, unsupported
from llmtrain.convert.families.llama import DECODER, SHARED, common_hf, decoder_fields, rules
from llmtrain.convert.families.moe import DEFAULTS, PROJECTIONS, Experts, hf_moe, moe_fields
from llmtrain.convert.families.qwen3 import qk_norm_rules, qwen3_fields

EXPERTS = Experts(block="mlp", projections=PROJECTIONS)


def _qwen2_fields(c) -> dict:
    problems: list[str] = []
    fields = decoder_fields(c, problems)
    if c.use_sliding_window:
        problems.append("sliding-window attention on some layers (use_sliding_window)")
    if not c.shared_expert_intermediate_size:
        problems.append("no shared expert (shared_expert_intermediate_size=0)")
    fields.update(moe_fields(c, problems, c.num_experts, c.moe_intermediate_size),
                  add_qkv_bias=bool(c.qkv_bias),
                  moe_shared_expert_intermediate_size=c.shared_expert_intermediate_size)
    unsupported("Qwen2-MoE", problems)
    return fields


def _qwen2_hf(m: ModelConfig):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**common_hf(m, "Qwen2MoeForCausalLM"), **hf_moe(m),
                          shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
                          qkv_bias=m.add_qkv_bias, use_sliding_window=False)


def _qwen3_fields(c) -> dict:
    problems: list[str] = []
    fields = qwen3_fields(c, problems)
    fields.update(moe_fields(c, problems, c.num_experts, c.moe_intermediate_size))
    unsupported("Qwen3-MoE", problems)
    return fields


def _qwen3_hf(m: ModelConfig):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**common_hf(m, "Qwen3MoeForCausalLM"), **hf_moe(m),
                          attention_bias=False, use_sliding_window=False)


def _qwen2_rules(m: ModelConfig):
    return rules(m, experts=EXPERTS)


def _qwen3_rules(m: ModelConfig):
    return qk_norm_rules(m, experts=EXPERTS)


QWEN2_MOE = Family(
    name="qwen2_moe", architecture="Qwen2MoeForCausalLM", model_type="qwen2_moe",
    from_hf=_qwen2_fields, hf_config=_qwen2_hf,
    defaults=dict(DECODER, moe_shared_expert_gate=True, **DEFAULTS),
    sizes=("qwen1_5_moe_a2_7b",), **dict(SHARED, rules=_qwen2_rules))
QWEN3_MOE = Family(
    name="qwen3_moe", architecture="Qwen3MoeForCausalLM", model_type="qwen3_moe",
    from_hf=_qwen3_fields, hf_config=_qwen3_hf,
    defaults=dict(DECODER, add_qkv_bias=False, qk_layernorm=True, **DEFAULTS),
    sizes=("qwen3_30b_a3b", "qwen3_235b_a22b"), **dict(SHARED, rules=_qwen3_rules))
