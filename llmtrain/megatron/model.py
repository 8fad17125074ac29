"""Builds Megatron-Core GPT models from a `Config`: the one place that knows the model class.

Megatron-Core 0.19 marks GPTModel deprecated in favour of HybridModel; GPTModel still carries the
Llama 3.1 RoPE scaling we need, so it is used here, and a later switch touches only this module.
"""

from __future__ import annotations

import warnings
from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.activations import quick_gelu
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config
from llmtrain.config.validate import te_op_fuser_fits
from llmtrain.megatron.specs import add_embedding_layernorm, gpt_block_spec, mark_attention_sinks

ACTIVATIONS = {
    "swiglu": (F.silu, True),
    "quick_geglu": (quick_gelu, True),
    "gelu": (F.gelu, False),
    "gelu_tanh": (partial(F.gelu, approximate="tanh"), False),
    "relu": (F.relu, False),
}


def params_dtype(cfg: Config) -> torch.dtype:
    if cfg.precision.bf16:
        return torch.bfloat16
    if cfg.precision.fp16:
        return torch.float16
    return torch.float32


def transformer_config(cfg: Config, layout: Layout) -> TransformerConfig:
    """Megatron's TransformerConfig for this run: architecture, layout, precision and fusions."""
    m, par, prec = cfg.model, cfg.parallel, cfg.precision
    activation, gated = ACTIVATIONS[m.activation]
    cuda = layout.device == "cuda"
    dtype = params_dtype(cfg)
    own_pp = layout.pipeline_model_parallel_size == par.pipeline_model_parallel_size
    config_class, mla = TransformerConfig, {}
    if m.multi_latent_attention:
        config_class, mla = MLATransformerConfig, dict(
            q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_head_dim=m.qk_head_dim,
            qk_pos_emb_head_dim=m.qk_pos_emb_head_dim, v_head_dim=m.v_head_dim,
            rope_type=m.rope_type, rotary_base=m.rotary_base, rotary_percent=m.rotary_percent,
            rotary_scaling_factor=m.rotary_scaling_factor,
            original_max_position_embeddings=m.original_max_position_embeddings,
            beta_fast=m.beta_fast, beta_slow=m.beta_slow, mscale=m.mscale,
            mscale_all_dim=m.mscale_all_dim)
    config = config_class(
        **mla,
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        normalization=m.normalization,
        layernorm_epsilon=m.layernorm_epsilon,
        activation_func=activation,
        gated_linear_unit=gated,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        window_size=tuple(m.window_size) if m.window_size else None,
        window_attn_skip_freq=(m.window_attn_skip_freq if m.window_attn_skip_freq is None
                               or isinstance(m.window_attn_skip_freq, int)
                               else list(m.window_attn_skip_freq)),
        softmax_type=m.softmax_type,
        glu_linear_offset=m.glu_linear_offset,
        activation_func_clamp_value=m.activation_func_clamp_value,
        rotary_interleaved=m.rotary_interleaved,
        attention_dropout=m.attention_dropout,
        hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        num_moe_experts=m.num_moe_experts,
        moe_router_topk=m.moe_router_topk,
        moe_ffn_hidden_size=m.moe_ffn_hidden_size,
        moe_layer_freq=(m.moe_layer_freq if isinstance(m.moe_layer_freq, int)
                        else list(m.moe_layer_freq)),
        moe_router_topk_scaling_factor=m.moe_router_topk_scaling_factor,
        moe_shared_expert_intermediate_size=m.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=m.moe_shared_expert_gate,
        moe_router_load_balancing_type=m.moe_router_load_balancing_type,
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        moe_router_pre_softmax=m.moe_router_pre_softmax,
        moe_router_dtype=m.moe_router_dtype,
        moe_router_score_function=m.moe_router_score_function,
        moe_router_num_groups=m.moe_router_num_groups,
        moe_router_group_topk=m.moe_router_group_topk,
        moe_router_enable_expert_bias=m.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=m.moe_router_bias_update_rate,
        moe_expert_capacity_factor=m.moe_expert_capacity_factor,
        moe_token_drop_policy=m.moe_token_drop_policy,
        moe_pad_expert_input_to_capacity=m.moe_pad_expert_input_to_capacity,
        moe_grouped_gemm=bool(m.num_moe_experts) and layout.use_transformer_engine,
        # Layout.
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        # The run's uneven stages (a role on a layout of its own has its own pipeline).
        num_layers_in_first_pipeline_stage=par.num_layers_in_first_pipeline_stage if own_pp
        else None,
        num_layers_in_last_pipeline_stage=par.num_layers_in_last_pipeline_stage if own_pp
        else None,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        pipeline_dtype=dtype,
        # Pipeline sends and receives one by one (Megatron-LM's default; Megatron-Core's is
        # batched): a batch matches the messages between two ranks in issue order, which swaps
        # activations and gradients with PP = 2 and VPP (seen with gloo and with NCCL).
        batch_p2p_comm=False,
        moe_token_dispatcher_type=par.moe_token_dispatcher_type or (
            "alltoall" if cuda else "allgather"),
        # Memory.
        recompute_granularity=par.recompute_granularity,
        recompute_method=par.recompute_method,
        recompute_num_layers=par.recompute_num_layers,
        cpu_offloading=par.cpu_offloading,
        cpu_offloading_num_layers=par.cpu_offloading_num_layers,
        # Precision.
        params_dtype=dtype,
        bf16=prec.bf16,
        fp16=prec.fp16,
        fp8=prec.fp8,
        fp8_recipe=prec.fp8_recipe if prec.fp8 else "delayed",
        # Loss: sum over tokens, divided once by the global token count (exact across layouts).
        calculate_per_token_loss=True,
        # Weights are set by llmtrain.megatron.init, identically for every layout.
        perform_initialization=False,
        use_cpu_initialization=not cuda,
        # Fused kernels exist only on the GPU.
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=cuda,
        # Megatron fuses (bias +) SwiGLU exactly; its fused bias-GELU is the tanh approximation
        # whatever GELU is configured (and refuses GPT-2's tanh GELU), so GELU runs unfused.
        bias_activation_fusion=cuda and m.activation == "swiglu",
        # Megatron's fused softmax and persistent LayerNorm are Apex kernels of its local layers
        # (Transformer Engine's layers have their own): without Apex they fail to build.
        masked_softmax_fusion=False,
        # Megatron-Core fuses multi-latent attention's RoPE for YaRN only.
        apply_rope_fusion=cuda and layout.use_transformer_engine and (
            not m.multi_latent_attention or m.rope_type == "yarn"),
        persist_layer_norm=False,
        cross_entropy_loss_fusion=cuda and layout.use_transformer_engine,
        cross_entropy_fusion_impl="te" if layout.use_transformer_engine else "native",
    )
    if m.rope_type == "yarn" and not m.multi_latent_attention:
        # GPTModel's YaRN and its attention's factor read these from the config (Megatron-LM
        # sets them from its arguments the same way).
        for name, value in yarn_fields(m).items():
            setattr(config, name, value)
    return config


def yarn_fields(m) -> dict:
    """The `yarn_*` attributes of a TransformerConfig outside multi-latent attention."""
    return dict(yarn_rotary_scaling_factor=m.rotary_scaling_factor,
                yarn_original_max_position_embeddings=m.original_max_position_embeddings,
                yarn_beta_fast=m.beta_fast, yarn_beta_slow=m.beta_slow, yarn_mscale=m.mscale,
                yarn_mscale_all_dim=m.mscale_all_dim,
                yarn_correction_range_round_to_int=m.yarn_correction_range_round_to_int)


def block_spec(cfg: Config, layout: Layout, config: TransformerConfig, vp_stage: int | None,
               own_groups: bool = False):
    """Transformer Engine's fused layers on a GPU that has it, Megatron's local layers otherwise.
    Megatron's fused MLP (the operation fuser) reads the run's tensor-parallel group from
    parallel_state, so a model on process groups of its own (`own_groups`) goes without."""
    fuser = te_op_fuser(cfg, layout) and not own_groups
    return gpt_block_spec(cfg.model, layout.use_transformer_engine, fuser, config, vp_stage)


def build_model(cfg: Config, layout: Layout, model_class: type = GPTModel,
                groups: ProcessGroupCollection | None = None) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage), on the run's device
    (`model_class`: GPTModel or a subclass, e.g. with a reward head). `groups`: process groups
    of a layout of its own, without pipeline stages (an alignment role's, llmtrain.megatron.
    align.placement); None: the run's, Megatron's parallel_state."""
    config = transformer_config(cfg, layout)
    vpp = layout.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        whole = groups is not None  # own groups: one stage, which embeds and ends the model
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*GPTModel IS DEPRECATED.*")
            model = model_class(
                config=config,
                transformer_layer_spec=block_spec(cfg, layout, config, stage, whole),
                vocab_size=layout.padded_vocab_size,
                max_sequence_length=max(cfg.model.max_position_embeddings, cfg.data.seq_length),
                pre_process=whole or ps.is_pipeline_first_stage(ignore_virtual=False,
                                                                vp_stage=stage),
                post_process=whole or ps.is_pipeline_last_stage(ignore_virtual=False,
                                                                vp_stage=stage),
                share_embeddings_and_output_weights=cfg.model.share_embeddings_and_output_weights,
                position_embedding_type=position_embedding_type(cfg.model),
                rotary_percent=cfg.model.rotary_percent,
                rotary_base=cfg.model.rotary_base,
                rope_scaling=cfg.model.rope_scaling,
                rope_scaling_factor=cfg.model.rope_scaling_factor,
                seq_len_interpolation_factor=cfg.model.seq_len_interpolation_factor,
                vp_stage=stage,
                pg_collection=groups,
            )
        mark_attention_sinks(model)
        if cfg.model.embedding_layernorm and model.pre_process:
            add_embedding_layernorm(model.embedding, config, layout.use_transformer_engine)
        if layout.device == "cuda":
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    if wgrad_accumulation_fusion(cfg, layout):
        for chunk in chunks:
            fuse_wgrad_accumulation(chunk)
    return chunks


def position_embedding_type(m) -> str:
    """GPTModel's: ALiBi lives in the attention (layer spec), not in the embedding; YaRN
    outside multi-latent attention is GPTModel's `yarn` (MLA rotates positions itself)."""
    if m.position_embedding_type == "alibi":
        return "none"
    if (m.position_embedding_type == "rope" and m.rope_type == "yarn"
            and not m.multi_latent_attention):
        return "yarn"
    return m.position_embedding_type


def wgrad_accumulation_fusion(cfg: Config, layout: Layout) -> bool:
    setting = cfg.precision.gradient_accumulation_fusion
    return layout.use_transformer_engine if setting is None else setting


def te_op_fuser(cfg: Config, layout: Layout) -> bool:
    """Measured on an H100 (docs/performance.md): +0.6% bf16, +2% fp8 for Llama 3.2 1B."""
    setting = cfg.precision.use_te_op_fuser
    if setting is not None:
        return setting
    return te_op_fuser_fits(cfg, layout.use_transformer_engine)


def fuse_wgrad_accumulation(chunk: torch.nn.Module) -> None:
    """Let Transformer Engine's layers accumulate weight gradients into the DDP buffer.

    Megatron's switch for this (gradient_accumulation_fusion) also covers the output layer,
    a plain Megatron layer that needs Apex's kernel for it; the Transformer Engine layers need
    nothing more, so they are switched on one by one and the output layer keeps its own path."""
    for module in chunk.modules():
        if hasattr(module, "fuse_wgrad_accumulation"):
            module.fuse_wgrad_accumulation = True
