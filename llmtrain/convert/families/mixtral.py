"""Mixtral (8x7B, 8x22B): Mistral's decoder with a mixture of experts in place of each MLP,
the top 2 of 8 weighted by a softmax over their two router logits."""

from __future__ import annotations

from llmtrain.config.schema import ModelConfig
from llmtrain.convert.families import Family, unsupported
from llmtrain.convert.families.llama import DECODER, SHARED, common_hf, decoder_fields, rules
from llmtrain.convert.families.moe import DEFAULTS, Experts, moe_fields

EXPERTS = Experts(block="block_sparse_moe", projections=("w1", "w3", "w2"))


def _fields(c) -> dict:
    problems: list[str] = []
    fields = decoder_fields(c, problems)
    if c.sliding_window:
        fields["window_size"] = [c.sliding_window - 1, 0]
    # Each expert is as wide as intermediate_size (Megatron's ffn_hidden_size).
    fields.update(moe_fields(c, problems, c.num_local_experts, None))
    unsupported("Mixtral", problems)
    return fields


def _hf(m: ModelConfig):
    from transformers import MixtralConfig

    window = m.window_size[0] + 1 if m.window_size else None
    return MixtralConfig(**common_hf(m, "MixtralForCausalLM"), sliding_window=window,
                         num_local_experts=m.num_moe_experts,
                         num_experts_per_tok=m.moe_router_topk,
                         router_aux_loss_coef=m.moe_aux_loss_coeff)


def _rules(m: ModelConfig):
    return rules(m, experts=EXPERTS)


MIXTRAL = Family(name="mixtral", architecture="MixtralForCausalLM", model_type="mixtral",
                 from_hf=_fields, hf_config=_hf, defaults=dict(DECODER, **DEFAULTS),
                 sizes=("mixtral_8x7b",), **dict(SHARED, rules=_rules))
