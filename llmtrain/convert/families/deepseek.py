"""DeepSeek-V2 (V2-Lite: 15.7B) and DeepSeek-V3 (671B): Llama's pre-norm layout with multi-latent
attention, dense layers first (first_k_dense_replace), then mixtures of many narrow routed experts
beside always-on shared ones (n_shared_experts of them: one ungated MLP as wide as all of them).

Routing: V3 scores each expert with a sigmoid, adds a per-expert bias for the choice alone
(e_score_correction_bias: Megatron-Core's expert bias), limits each token to topk_group of
n_group groups (ranked by the sum of their two best scores) and renormalises the chosen scores;
V2 takes a softmax over all experts and keeps the top k as they are (greedy). Both multiply the
weights by routed_scaling_factor (moe_router_topk_scaling_factor).

RoPE: the rotated channels of each query and of the shared key are interleaved pairs; Megatron-
Core's multi-latent attention rotates them in that layout, so the projections convert unchanged.
YaRN (the published configs') is Megatron-Core's multi-latent-attention YaRN.

Multi-token prediction: V3's checkpoints hold one more layer (number num_hidden_layers) for it;
llmtrain does not train it, and the conversion skips its tensors and says so.
"""

from __future__ import annotations

from functools import partial

from llmtrain.config.layers import moe_layers
from llmtrain.config.schema import ModelConfig
from llmtrain.convert.families import Family, unsupported
from llmtrain.convert.families.llama import DECODER, SHARED, rules
from llmtrain.convert.families.moe import DEFAULTS, PROJECTIONS, Experts
from llmtrain.convert.mapping import Rule

EXPERTS = Experts(block="mlp", projections=PROJECTIONS, shared="shared_experts")
# What both have: multi-latent attention with a norm on each latent (q_a_layernorm,
# kv_a_layernorm: qk_layernorm), YaRN's defaults where a config leaves them out.
MLA = dict(DECODER, multi_latent_attention=True, qk_layernorm=True, **DEFAULTS)


def rope_fields(c, problems: list[str], unrounded: bool = False) -> dict:
    """RoPE without scaling or with YaRN, from a Hugging Face config (`unrounded`: the family's
    YaRN may keep the ramp's ends unrounded, truncate=false, which Megatron-Core's YaRN outside
    multi-latent attention does too)."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    theta = float(rope.get("rope_theta", 10000.0))
    if theta != int(theta):
        problems.append(f"a fractional RoPE base {theta}")
    if float(rope.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
        problems.append("partial rotary embeddings (partial_rotary_factor)")
    fields = {"position_embedding_type": "rope", "rotary_base": int(theta), "rope_type": "rope"}
    kind = rope.get("rope_type", "default")
    if kind == "yarn":
        original = int(rope["original_max_position_embeddings"])
        factor = rope.get("factor") or c.max_position_embeddings / original
        # transformers takes the attention factor mscale / mscale_all_dim only when both are
        # set (else YaRN's own, Megatron-Core's with mscale 1 and mscale_all_dim 0).
        mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        if all_dim and not mscale:
            problems.append("YaRN with mscale_all_dim but no mscale (Megatron-Core scales the "
                            "attention by mscale / mscale_all_dim)")
        if rope.get("attention_factor") is not None:
            problems.append("YaRN with an explicit attention_factor")
        if rope.get("truncate", True) is False and unrounded:
            fields["yarn_correction_range_round_to_int"] = False
        elif rope.get("truncate", True) is False:
            problems.append("YaRN with truncate=false (Megatron-Core's multi-latent attention "
                            "rounds the ramp's ends)")
        fields.update(rope_type="yarn", rotary_scaling_factor=float(factor),
                      original_max_position_embeddings=original,
                      beta_fast=float(rope.get("beta_fast") or 32),
                      beta_slow=float(rope.get("beta_slow") or 1),
                      mscale=float(mscale) if mscale and all_dim else 1.0,
                      mscale_all_dim=float(all_dim) if mscale and all_dim else 0.0)
    elif kind != "default":
        problems.append(f"RoPE scaling of type {kind!r} (default and yarn convert)")
    return fields


def _fields(c, problems: list[str]) -> dict:
    """What V2 and V3 configs share."""
    if c.hidden_act != "silu":
        problems.append(f"hidden_act={c.hidden_act} (DeepSeek uses silu, SwiGLU)")
    if c.attention_bias or getattr(c, "mlp_bias", False):
        problems.append("biases on the projections (attention_bias, mlp_bias)")
    if getattr(c, "quantization_config", None):
        problems.append("quantized weights (quantization_config: DeepSeek-V3's published FP8 "
                        "weights with their block scales): dequantize them to bf16 first "
                        "(DeepSeek-V3's inference/fp8_cast_bf16.py), then convert that folder")
    if c.num_key_value_heads != c.num_attention_heads:
        problems.append(f"num_key_value_heads={c.num_key_value_heads} other than "
                        f"num_attention_heads={c.num_attention_heads} (multi-latent attention "
                        f"gives every head its own key and value)")
    return {
        "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
        "layernorm_epsilon": c.rms_norm_eps,
        "share_embeddings_and_output_weights": bool(c.tie_word_embeddings),
        "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
        "qk_head_dim": c.qk_nope_head_dim, "qk_pos_emb_head_dim": c.qk_rope_head_dim,
        "v_head_dim": c.v_head_dim, **experts_fields(c), **rope_fields(c, problems),
    }


def experts_fields(c) -> dict:
    """DeepSeek's mixture of experts in Megatron-Core's terms (GLM-4.5 has the same): routed
    and shared experts, the dense layers before the MoE ones, the routed weights' scale."""
    dense, layers = c.first_k_dense_replace or 0, c.num_hidden_layers
    return {
        "num_moe_experts": c.n_routed_experts, "moe_router_topk": c.num_experts_per_tok,
        "moe_ffn_hidden_size": c.moe_intermediate_size,
        "moe_shared_expert_intermediate_size": (c.n_shared_experts or 0)
        * c.moe_intermediate_size or None,
        "moe_layer_freq": [0] * dense + [1] * (layers - dense) if dense else 1,
        "moe_router_topk_scaling_factor": (None if c.routed_scaling_factor == 1.0
                                           else float(c.routed_scaling_factor))}


def _v3_fields(c) -> dict:
    problems: list[str] = []
    fields = _fields(c, problems)
    if not getattr(c, "rope_interleave", True):
        problems.append("rope_interleave=false (RoPE on the two halves of the rotated channels; "
                        "Megatron-Core's multi-latent attention rotates interleaved pairs)")
    fields.update(sigmoid_routing_fields(c, "DeepSeek-V3", problems))
    unsupported("DeepSeek-V3", problems)
    return fields


def sigmoid_routing_fields(c, family: str, problems: list[str]) -> dict:
    """DeepSeek-V3's routing (GLM-4.5 has the same): sigmoid scores renormalised over the
    chosen experts, and group-limited top-k where the config has groups; what Megatron-Core
    cannot reproduce goes to `problems`."""
    if not c.norm_topk_prob:
        problems.append("norm_topk_prob=false (Megatron-Core renormalises sigmoid scores over the "
                        "chosen experts)")
    groups, chosen = c.n_group or 1, c.topk_group or 1
    if groups == 1:
        return {}
    if c.num_experts_per_tok // chosen != 2:
        problems.append(f"group-limited routing with num_experts_per_tok={c.num_experts_per_tok} "
                        f"over topk_group={chosen}: {family} ranks groups by their two best "
                        f"scores, Megatron-Core by their best num_experts_per_tok / topk_group")
    return {"moe_router_num_groups": groups, "moe_router_group_topk": chosen}


def _v2_fields(c) -> dict:
    problems: list[str] = []
    fields = _fields(c, problems)
    groups, chosen = c.n_group or 1, c.topk_group or 1
    if c.topk_method == "group_limited_greedy" and groups > 1:
        if c.num_experts_per_tok // chosen != 1:
            problems.append(f"topk_method=group_limited_greedy with num_experts_per_tok="
                            f"{c.num_experts_per_tok} over topk_group={chosen}: DeepSeek-V2 ranks "
                            f"groups by their best score, Megatron-Core by the sum of their best "
                            f"num_experts_per_tok / topk_group")
        fields.update(moe_router_num_groups=groups, moe_router_group_topk=chosen)
    elif c.topk_method not in ("greedy", "group_limited_greedy"):
        problems.append(f"topk_method={c.topk_method} (greedy and group_limited_greedy convert)")
    unsupported("DeepSeek-V2", problems)
    return fields


def hf_rope(m: ModelConfig) -> dict:
    """The Hugging Face `rope_parameters` of `rope_fields`."""
    rope = {"rope_type": "default", "rope_theta": float(m.rotary_base)}
    if m.rope_type == "yarn":
        rope.update(rope_type="yarn", factor=m.rotary_scaling_factor,
                    original_max_position_embeddings=m.original_max_position_embeddings,
                    beta_fast=m.beta_fast, beta_slow=m.beta_slow)
        if m.mscale_all_dim:
            rope.update(mscale=m.mscale, mscale_all_dim=m.mscale_all_dim)
        if not m.yarn_correction_range_round_to_int:
            rope["truncate"] = False
    return rope


def _hf_fields(m: ModelConfig, architecture: str) -> dict:
    rope = hf_rope(m)
    flags = moe_layers(m)
    return dict(
        architectures=[architecture], vocab_size=m.vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size, moe_intermediate_size=m.moe_ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_attention_heads, n_routed_experts=m.num_moe_experts,
        n_shared_experts=(m.moe_shared_expert_intermediate_size or 0) // m.moe_ffn_hidden_size,
        num_experts_per_tok=m.moe_router_topk,
        routed_scaling_factor=m.moe_router_topk_scaling_factor or 1.0,
        first_k_dense_replace=flags.index(True) if True in flags else m.num_layers,
        q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_head_dim,
        qk_rope_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
        n_group=m.moe_router_num_groups or 1, topk_group=m.moe_router_group_topk or 1,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.layernorm_epsilon,
        hidden_act="silu", tie_word_embeddings=m.share_embeddings_and_output_weights,
        rope_parameters=rope, attention_bias=False)


def _v3_hf(m: ModelConfig):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**_hf_fields(m, "DeepseekV3ForCausalLM"), norm_topk_prob=True,
                            rope_interleave=True)


def _v2_hf(m: ModelConfig):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(**_hf_fields(m, "DeepseekV2ForCausalLM"), norm_topk_prob=False,
                            topk_method=("group_limited_greedy" if m.moe_router_group_topk
                                         else "greedy"))


def mla_rules(m: ModelConfig, mcore: str, hf: str) -> list[Rule]:
    """Multi-latent attention: queries straight from the hidden state (q_proj, V2-Lite) or
    through their normalised latent (q_a_proj, q_a_layernorm, q_b_proj); the keys' and values'
    latent with the shared RoPE key (kv_a_proj_with_mqa: [latent; RoPE key], Megatron's order),
    its norm, its up projection ([key; value] per head, Megatron's order too)."""
    if m.q_lora_rank is None:
        result = [Rule(f"{mcore}.linear_q_proj.weight", (f"{hf}.q_proj.weight",))]
    else:
        result = [Rule(f"{mcore}.linear_q_down_proj.weight", (f"{hf}.q_a_proj.weight",)),
                  Rule(f"{mcore}.q_layernorm.weight", (f"{hf}.q_a_layernorm.weight",)),
                  Rule(f"{mcore}.linear_q_up_proj.weight", (f"{hf}.q_b_proj.weight",))]
    return result + [
        Rule(f"{mcore}.linear_kv_down_proj.weight", (f"{hf}.kv_a_proj_with_mqa.weight",)),
        Rule(f"{mcore}.kv_layernorm.weight", (f"{hf}.kv_a_layernorm.weight",)),
        Rule(f"{mcore}.linear_kv_up_proj.weight", (f"{hf}.kv_b_proj.weight",)),
        Rule(f"{mcore}.linear_proj.weight", (f"{hf}.o_proj.weight",))]


_RULES = partial(rules, experts=EXPERTS, attention=mla_rules)
DEEPSEEK_V3 = Family(
    name="deepseek_v3", architecture="DeepseekV3ForCausalLM", model_type="deepseek_v3",
    from_hf=_v3_fields, hf_config=_v3_hf,
    # Sigmoid scores with the aux-loss-free expert bias, and DeepSeek-V3's small sequence-wise
    # balance loss (its paper's alpha).
    defaults=dict(MLA, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                  moe_router_pre_softmax=False, moe_router_load_balancing_type="seq_aux_loss",
                  moe_aux_loss_coeff=1e-4),
    sizes=("deepseek_v3",), extra_layers="multi-token prediction",
    **dict(SHARED, rules=_RULES))
DEEPSEEK_V2 = Family(
    name="deepseek_v2", architecture="DeepseekV2ForCausalLM", model_type="deepseek_v2",
    from_hf=_v2_fields, hf_config=_v2_hf,
    # A softmax over all experts, the top k unnormalised; DeepSeek-V2's balance loss (alpha_1).
    defaults=dict(MLA, moe_router_pre_softmax=True, moe_router_load_balancing_type="seq_aux_loss",
                  moe_aux_loss_coeff=1e-3),
    sizes=("deepseek_v2_lite",), **dict(SHARED, rules=_RULES))
