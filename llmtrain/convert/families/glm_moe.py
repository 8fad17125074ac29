"""GLM-4.5 (transformers' Glm4MoeForCausalLM: 355B-A32B, Air 106B-A12B): grouped-query attention
with Q/K/V biases, optional Q/K norms (use_qk_norm) and RoPE on the first half of each head's
channels in two halves (rotate_half, not interleaved pairs), then DeepSeek-V3's mixture of experts:
dense layers first, sigmoid routing with the expert bias, group-limited top-k, shared experts.

Multi-token prediction: the published checkpoints hold num_nextn_predict_layers more layers;
llmtrain does not train them, and the conversion skips their tensors and says so."""

from __future__ import annotations

from llmtrain.config.layers import moe_layers
from llmtrain.config.schema import ModelConfig
from llmtrain.convert.families import Family, unsupported
from llmtrain.convert.families.deepseek import EXPERTS, experts_fields, sigmoid_routing_fields
from llmtrain.convert.families.llama import DECODER, SHARED, common_hf, decoder_fields, rules
from llmtrain.convert.families.moe import DEFAULTS
from llmtrain.convert.families.qwen3 import qk_norm_rules


def _fields(c) -> dict:
    problems: list[str] = []
    fields = decoder_fields(c, problems, partial_rotary=True)
    fields.update(add_qkv_bias=bool(c.attention_bias), qk_layernorm=bool(c.use_qk_norm),
                  **experts_fields(c), **sigmoid_routing_fields(c, "GLM-4.5", problems))
    unsupported("GLM-4.5", problems)
    return fields


def _hf(m: ModelConfig):
    from transformers import Glm4MoeConfig

    flags = moe_layers(m)
    return Glm4MoeConfig(
        **common_hf(m, "Glm4MoeForCausalLM"), attention_bias=m.add_qkv_bias,
        use_qk_norm=m.qk_layernorm, n_routed_experts=m.num_moe_experts,
        n_shared_experts=(m.moe_shared_expert_intermediate_size or 0) // m.moe_ffn_hidden_size,
        moe_intermediate_size=m.moe_ffn_hidden_size, num_experts_per_tok=m.moe_router_topk,
        routed_scaling_factor=m.moe_router_topk_scaling_factor or 1.0,
        first_k_dense_replace=flags.index(True) if True in flags else m.num_layers,
        n_group=m.moe_router_num_groups or 1, topk_group=m.moe_router_group_topk or 1,
        norm_topk_prob=True, num_nextn_predict_layers=0)


def _rules(m: ModelConfig):
    return (qk_norm_rules if m.qk_layernorm else rules)(m, experts=EXPERTS)


GLM4_MOE = Family(
    name="glm4_moe", architecture="Glm4MoeForCausalLM", model_type="glm4_moe",
    from_hf=_fields, hf_config=_hf,
    defaults=dict(DECODER, rotary_interleaved=False, moe_router_score_function="sigmoid",
                  moe_router_enable_expert_bias=True, moe_router_pre_softmax=False, **DEFAULTS),
    sizes=("glm4_5", "glm4_5_air"), extra_layers="multi-token prediction",
    **dict(SHARED, rules=_rules))
