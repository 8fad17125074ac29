"""Layer specs for architectures Megatron-Core's GPT specs do not describe, built from its parts.

- ALiBi (Bloom): the core attention is `AlibiDotProductAttention` (llmtrain.megatron.alibi).
- Parallel attention and MLP (Falcon): `ParallelAttentionMLPLayer`, x + attn(ln(x)) + mlp(ln'(x)),
  with one shared norm (Falcon 7B) or a norm of its own for the MLP (Falcon 40B/180B). Its norms are
  separate modules, not fused into the following linear layer as Transformer Engine's spec does, so
  that one norm can feed both branches; checkpoints have the same names on CPU and GPU.
- Embedding LayerNorm (Bloom): a norm applied to the embedding's output.
- Multi-latent attention (DeepSeek): on the local layers `LatentDotProductAttention`, whose key
  and value heads differ in size, and a query without a latent norm (`DirectQueryAttention`;
  llmtrain.megatron.mla).
- Attention sinks (gpt-oss, softmax_type=learnable): Megatron's core attention holds them;
  `mark_attention_sinks` gives them the tensor-parallel attributes of a per-head tensor.
- Biased experts on the local layers (gpt-oss): `ExpertRowParallelLinear`, whose output
  Megatron-Core may add the expert's bias to in place.
- Dense layers among MoE ones (DeepSeek's first layers: moe_layer_freq): each layer gets the
  dense or the MoE spec of its own kind.

Every spec is assembled from a backend (Megatron's local layers on CPU, Transformer Engine's on a
GPU that has it), so the same architecture trains on both and their checkpoints agree.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import LocalSpecProvider
from megatron.core.tensor_parallel.layers import (
    RowParallelLinear,
    set_tensor_model_parallel_attributes,
)
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.utils import make_viewless_tensor

from llmtrain.config.layers import moe_layers
from llmtrain.config.schema import ModelConfig
from llmtrain.megatron.alibi import AlibiDotProductAttention
from llmtrain.megatron.mla import DirectQueryAttention, LatentDotProductAttention


class ParallelAttentionMLPLayer(TransformerLayer):
    """Falcon's block: attention and MLP read the (normalised) layer input side by side, and
    their sum joins the residual once."""

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, rotary_pos_cos=None,
                rotary_pos_sin=None, attention_bias=None, inference_context=None,
                packed_seq_params=None, sequence_len_offset=None, **unused):
        attention_input = self.input_layernorm(hidden_states)
        mlp_input = (attention_input if isinstance(self.pre_mlp_layernorm, IdentityOp)
                     else self.pre_mlp_layernorm(hidden_states))
        attention_output, attention_out_bias = self.self_attention(
            attention_input, attention_mask=attention_mask, inference_context=inference_context,
            rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos,
            rotary_pos_sin=rotary_pos_sin, attention_bias=attention_bias,
            packed_seq_params=packed_seq_params, sequence_len_offset=sequence_len_offset)
        mlp_output, mlp_bias = self.mlp(mlp_input)
        biases = [b for b in (attention_out_bias, mlp_bias) if b is not None]
        bias = sum(biases[1:], biases[0]) if biases else None
        with self.bias_dropout_add_exec_handler():
            output = self.mlp_bda(self.training, self.config.bias_dropout_fusion)(
                (mlp_output + attention_output, bias), hidden_states, self.hidden_dropout)
        return make_viewless_tensor(inp=output, requires_grad=output.requires_grad,
                                    keep_graph=True), None


class ExpertRowParallelLinear(RowParallelLinear):
    """A local expert's second linear layer whose output is a tensor of its own. Megatron-Core
    adds a biased expert's weighted bias to that output in place, which autograd refuses when
    the layer returns it as a view of its (at one TP rank: identity) reduction: training fails
    on the local layers, though not without gradients (conversion, generation)."""

    def forward(self, *args, **kwargs):
        output, bias = super().forward(*args, **kwargs)
        return output.clone(), bias


def _backend(use_te: bool):
    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        return TESpecProvider()
    return LocalSpecProvider()


def _parallel_layer_spec(m: ModelConfig, use_te: bool) -> ModuleSpec:
    backend = _backend(use_te)
    norm = backend.layer_norm(rms_norm=m.normalization == "RMSNorm")
    qk_norm = backend.layer_norm(rms_norm=m.normalization == "RMSNorm", for_qk=True)
    core_attention = (AlibiDotProductAttention if m.position_embedding_type == "alibi"
                      else backend.core_attention())
    return ModuleSpec(
        module=ParallelAttentionMLPLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=backend.column_parallel_linear(),
                    core_attention=core_attention,
                    linear_proj=backend.row_parallel_linear(),
                    q_layernorm=qk_norm if m.qk_layernorm else IdentityOp,
                    k_layernorm=qk_norm if m.qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm if m.parallel_mlp_layernorm else IdentityOp,
            mlp=partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(
                linear_fc1=backend.column_parallel_linear(),
                linear_fc2=backend.row_parallel_linear())),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def gpt_layer_spec(m: ModelConfig, use_te: bool, te_op_fuser: bool = False,
                   moe: bool | None = None) -> ModuleSpec:
    """The transformer layer of model `m`, on Transformer Engine's layers or Megatron's own
    (`te_op_fuser`: the dense MLP through Transformer Engine's operation fuser; `moe`: whether
    this layer holds the experts, None: wherever the model has them)."""
    if m.parallel_attention_mlp:
        return _parallel_layer_spec(m, use_te)
    experts = m.num_moe_experts if moe or moe is None else None
    if use_te:
        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=bool(experts), qk_layernorm=m.qk_layernorm,
            multi_latent_attention=m.multi_latent_attention, use_te_op_fuser=te_op_fuser)
    else:
        spec = get_gpt_layer_local_spec(num_experts=experts, qk_layernorm=m.qk_layernorm,
                                        multi_latent_attention=m.multi_latent_attention,
                                        normalization=m.normalization)
        if m.multi_latent_attention:
            spec.submodules.self_attention.submodules.core_attention = LatentDotProductAttention
            spec.submodules.sharded_state_dict_keys_map = _mla_te_names(bool(experts))
        elif experts:
            if m.add_bias_linear:  # gpt-oss's biased experts
                moe = spec.submodules.mlp.keywords["submodules"]
                moe.experts.keywords["submodules"].linear_fc2 = ExpertRowParallelLinear
            # Megatron's local spec saves the pre-MLP norm under the name of Transformer
            # Engine's fused fc1 norm, but a TE MoE layer keeps that norm apart (its experts
            # have no fused fc1): keep the norm's own name, the one a GPU run loads.
            spec.submodules.sharded_state_dict_keys_map.pop("pre_mlp_layernorm.", None)
    if m.multi_latent_attention and m.q_lora_rank is None:
        spec.submodules.self_attention.module = DirectQueryAttention
    if m.position_embedding_type == "alibi":
        spec.submodules.self_attention.submodules.core_attention = AlibiDotProductAttention
    return spec


def _mla_te_names(moe: bool) -> dict[str, str]:
    """Checkpoint names of the local multi-latent attention layer's norms as Transformer
    Engine's layer has them (fused into the linear layer they feed), so that checkpoints written
    on CPU load on GPU: the latents' norms, and a dense layer's MLP norm (a MoE layer keeps its
    own `pre_mlp_layernorm` on both)."""
    names = {"self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
             "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_"}
    if not moe:
        names["pre_mlp_layernorm."] = "mlp.linear_fc1.layer_norm_"
    return names


def mark_attention_sinks(chunk: torch.nn.Module) -> None:
    """Attention sinks (softmax_type=learnable, gpt-oss) are one logit per head of this TP rank
    (Megatron's checkpoint shards them over TP) but carry no tensor-parallel attributes, which
    llmtrain's layout-free initialisation and whole-tensor loading read."""
    for name, param in chunk.named_parameters():
        if name.endswith("softmax_offset") and not hasattr(param, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(param, True, 0, 1)


def _normalize_output(module, args, output):
    return module.layernorm(output)


def add_embedding_layernorm(embedding: torch.nn.Module, config, use_te: bool) -> None:
    """Bloom normalises the word embeddings before the first layer: the norm becomes part of
    the embedding module (checkpoint name `embedding.layernorm.*`) and runs on its output."""
    norm = _backend(use_te).layer_norm(rms_norm=config.normalization == "RMSNorm")
    embedding.layernorm = norm(config=config, hidden_size=config.hidden_size,
                               eps=config.layernorm_epsilon)
    embedding.register_forward_hook(_normalize_output)


def gpt_block_spec(m: ModelConfig, use_te: bool, te_op_fuser: bool, config: TransformerConfig,
                   vp_stage: int | None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers and a final norm of the same backend. Given a bare layer
    spec, Megatron picks Transformer Engine's norm whenever TE is installed, which fails on CPU
    tensors (a CPU run, or a conversion's check, on a GPU machine)."""
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage)
    flags = moe_layers(m)[offset:offset + get_num_layers_to_build(config, vp_stage=vp_stage)]
    kinds = {moe: gpt_layer_spec(m, use_te, te_op_fuser, moe) for moe in set(flags)}
    return TransformerBlockSubmodules(
        layer_specs=[kinds[moe] for moe in flags],
        layer_norm=_backend(use_te).layer_norm(rms_norm=m.normalization == "RMSNorm"))
