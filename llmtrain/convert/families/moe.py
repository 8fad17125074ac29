"""Mixture-of-experts blocks of the Llama-layout decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): what a
Hugging Face config says about them, and where their tensors go.

Megatron-Core's MoE layer holds a router (`mlp.router.weight`, one row per expert), the routed
experts (`mlp.experts.local_experts.{e}.linear_fc1/fc2`, each a SwiGLU MLP) and, for Qwen2-MoE,
a shared expert with a sigmoid gate (`mlp.shared_experts.*`, `gate_weight`). That is the
checkpoint layout on CPU (SequentialMLP) and on GPU alike: Transformer Engine's grouped experts
(TEGroupedMLP, `experts.linear_fc1.weight{e}`) save and load under SequentialMLP's names.

Routing: the top-k experts' weights are a softmax over their k logits (Megatron's default, what
Mixtral computes and what Qwen's `norm_topk_prob=true` renormalisation amounts to), or a softmax
over all experts cut to the top k (`moe_router_pre_softmax`, Qwen's `norm_topk_prob=false`).
No capacity factor: no token is dropped, so both sides compute the same sums.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmtrain.config.layers import moe_layers
from llmtrain.config.schema import ModelConfig
from llmtrain.convert.mapping import Rule, gated_mlp

# Fields every MoE family has: the router computes in fp32 (Hugging Face takes the softmax of the
# router logits in fp32 too), whatever the precision.
DEFAULTS = dict(moe_router_dtype="fp32")
# Llama's names of an MLP's (gate, up, down) projections; Qwen's experts keep them.
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Experts:
    """How a family's Hugging Face checkpoints name the MoE block of a layer."""

    # The module holding router ("gate") and experts: "mlp" (Qwen), "block_sparse_moe" (Mixtral).
    block: str
    # Each expert's (gate, up, down) projections.
    projections: tuple[str, str, str]
    # The shared expert's module: Qwen's `shared_expert`, DeepSeek's `shared_experts`.
    shared: str = "shared_expert"

    def rules(self, m: ModelConfig, layer: str, hf: str) -> list[Rule]:
        block = f"{hf}.{self.block}"
        result = [Rule(f"{layer}.mlp.router.weight", (f"{block}.gate.weight",))]
        if m.moe_router_enable_expert_bias:  # DeepSeek-V3's bias on the scores of the choice
            result.append(Rule(f"{layer}.mlp.router.expert_bias",
                               (f"{block}.gate.e_score_correction_bias",)))
        result += gated_mlp(f"{layer}.mlp.experts.local_experts.{{e}}", f"{block}.experts.{{e}}",
                            self.projections, bias=False)
        if m.moe_shared_expert_intermediate_size:
            result += gated_mlp(f"{layer}.mlp.shared_experts", f"{block}.{self.shared}",
                                PROJECTIONS, bias=False)
        if m.moe_shared_expert_gate:
            result.append(Rule(f"{layer}.mlp.shared_experts.gate_weight",
                               (f"{block}.shared_expert_gate.weight",)))
        return result


def moe_fields(c, problems: list[str], experts: int, expert_size: int | None) -> dict:
    """The routing fields of a Hugging Face MoE config (`experts` and `expert_size` read by the
    family: their names differ)."""
    if getattr(c, "router_jitter_noise", 0.0):
        problems.append(f"router_jitter_noise={c.router_jitter_noise} (training-time noise on "
                        f"the router input, not carried)")
    # Qwen's dense layers among the MoE ones (intermediate_size wide): those of mlp_only_layers,
    # and all but every decoder_sparse_step-th.
    step, dense = getattr(c, "decoder_sparse_step", 1) or 1, getattr(c, "mlp_only_layers", None)
    flags = [int(i not in (dense or ()) and (i + 1) % step == 0)
             for i in range(c.num_hidden_layers)]
    return {"num_moe_experts": experts, "moe_router_topk": c.num_experts_per_tok,
            "moe_ffn_hidden_size": expert_size, "moe_layer_freq": 1 if all(flags) else flags,
            "moe_router_pre_softmax": not getattr(c, "norm_topk_prob", True),
            "moe_aux_loss_coeff": c.router_aux_loss_coef}


def hf_moe(m: ModelConfig) -> dict:
    """The Hugging Face config fields that Qwen's MoE configs share (Mixtral names them its own
    way)."""
    return dict(num_experts=m.num_moe_experts, num_experts_per_tok=m.moe_router_topk,
                moe_intermediate_size=m.moe_ffn_hidden_size,
                norm_topk_prob=not m.moe_router_pre_softmax,
                router_aux_loss_coef=m.moe_aux_loss_coeff, decoder_sparse_step=1,
                mlp_only_layers=[i for i, moe in enumerate(moe_layers(m)) if not moe])
