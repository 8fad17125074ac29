"""Arithmetic about a run, from its config alone: parameters, FLOPs per token, memory per GPU.

Used by `dry_run=true` (the plan printed before anything starts) and by the training log
(TFLOP/s and MFU). FLOPs count as Megatron does: 6 x parameters touched per token (forward and
backward matrix products, the output layer included, the embedding lookup not) plus causal
attention, 6 x layers x (heads x head size) x sequence length.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmtrain.config.layers import moe_layers
from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config, ModelConfig
from llmtrain.config.validate import pipeline_stage_layers

# Gated activations: their first linear layer is twice as wide ([gate; linear]).
GATED = ("swiglu", "quick_geglu")
GIB = 1024**3
# Dense bf16 peak of the GPUs we know, TFLOP/s (for MFU).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0,
               "A800": 312.0, "L40S": 362.0, "B200": 2250.0, "GB200": 2500.0}


def peak_tflops(device_name: str) -> float | None:
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_TFLOPS[key]
    return None


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # word embedding table
    position: int  # learned position table
    per_layer: int  # a layer's (a MoE layer's where dense layers sit among them)
    final_norm: int
    output: int  # output layer (0 when tied to the embedding)
    num_layers: int
    # The dense layers among MoE ones (moe_layer_freq): their indices and a dense layer's count.
    dense_layers: tuple[int, ...] = ()
    per_dense_layer: int = 0

    def layers(self, first: int = 0, count: int | None = None) -> int:
        """Parameters of the layers first, ..., first + count - 1 (default: all)."""
        stop = self.num_layers if count is None else first + count
        dense = sum(first <= i < stop for i in self.dense_layers)
        return self.per_layer * (stop - first - dense) + self.per_dense_layer * dense

    @property
    def total(self) -> int:
        return self.embedding + self.position + self.layers() + self.final_norm + self.output

    @property
    def matmul(self) -> int:
        """Parameters used in matrix products for each token (the output layer included)."""
        output = self.output or self.embedding
        return self.layers() + output


def _attention_parameters(m: ModelConfig, norm: int) -> int:
    h, bias = m.hidden_size, m.add_bias_linear
    if m.multi_latent_attention:  # down projections to the latents, their norms, up projections
        heads, q_head = m.num_attention_heads, m.qk_head_dim + m.qk_pos_emb_head_dim
        latent_norm = norm // h if m.qk_layernorm else 0
        query = (h * heads * q_head if m.q_lora_rank is None else
                 (h + latent_norm + heads * q_head) * m.q_lora_rank)
        kv = (h * (m.kv_lora_rank + m.qk_pos_emb_head_dim)
              + (latent_norm + heads * (m.qk_head_dim + m.v_head_dim)) * m.kv_lora_rank)
        return query + kv + heads * m.v_head_dim * h + h * bias
    head = m.kv_channels or h // m.num_attention_heads
    q_width = m.num_attention_heads * head
    kv_width = (m.num_query_groups or m.num_attention_heads) * head
    attention = h * (q_width + 2 * kv_width) + q_width * h
    attention += (q_width + 2 * kv_width) * (m.add_qkv_bias or bias) + h * bias
    if m.qk_layernorm:  # the Q and K norms: one head-sized weight each, shared by the heads
        attention += 2 * (norm // h) * head
    if m.softmax_type == "learnable":  # one sink logit per head
        attention += m.num_attention_heads
    return attention


def _mlp_parameters(m: ModelConfig, ffn: int) -> int:
    gated = 2 if m.activation in GATED else 1
    return m.hidden_size * ffn * gated + ffn * m.hidden_size + (
        ffn * gated + m.hidden_size) * m.add_bias_linear


def count_parameters(m: ModelConfig, padded_vocab: int) -> ParamCounts:
    h = m.hidden_size
    norm = 2 * h if m.normalization == "LayerNorm" else h
    attention = _attention_parameters(m, norm)
    dense_mlp = _mlp_parameters(m, m.ffn_hidden_size)
    mlp = dense_mlp
    if m.num_moe_experts:  # every routed expert, the router, the shared expert and its gate
        gated = 2 if m.activation in GATED else 1
        shared = m.moe_shared_expert_intermediate_size or 0
        router = h + m.add_bias_linear  # per expert: its row of the router, and its bias
        mlp = ((_expert_params(m) + router) * m.num_moe_experts + h * shared * (gated + 1)
               + h * m.moe_shared_expert_gate)
        # The router's expert bias (aux-loss-free balancing) is a buffer, not a parameter.
    # Falcon's parallel layers share one norm between attention and MLP unless told otherwise.
    layer_norms = 1 if m.parallel_attention_mlp and not m.parallel_mlp_layernorm else 2
    moe = moe_layers(m)
    return ParamCounts(
        embedding=padded_vocab * h + (norm if m.embedding_layernorm else 0),
        position=m.max_position_embeddings * h if m.position_embedding_type == "learned_absolute"
        else 0,
        per_layer=attention + mlp + layer_norms * norm,
        final_norm=norm,
        output=0 if m.share_embeddings_and_output_weights else padded_vocab * h,
        num_layers=m.num_layers,
        dense_layers=tuple(i for i, sparse in enumerate(moe) if not sparse) if any(moe) else (),
        per_dense_layer=attention + dense_mlp + layer_norms * norm,
    )


def flops_per_token(m: ModelConfig, padded_vocab: int, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward), Megatron's way."""
    counts = count_parameters(m, padded_vocab)
    matmul = counts.matmul
    if m.num_moe_experts:  # only top-k experts of each MoE layer touch a token
        sparse = m.num_layers - len(counts.dense_layers)
        matmul -= _expert_params(m) * (m.num_moe_experts - m.moe_router_topk) * sparse
    return 6.0 * matmul + 6.0 * m.num_layers * _attention_width(m) * seq_length


def _attention_width(m: ModelConfig) -> float:
    """Channels of one token's scores and weighted values, halved (Q K^T and A V)."""
    if m.multi_latent_attention:
        return m.num_attention_heads * (m.qk_head_dim + m.qk_pos_emb_head_dim + m.v_head_dim) / 2
    return m.num_attention_heads * (m.kv_channels or m.hidden_size // m.num_attention_heads)


def _expert_params(m: ModelConfig) -> int:
    return _mlp_parameters(m, m.moe_ffn_hidden_size or m.ffn_hidden_size)


def _activation_bytes_per_token(m: ModelConfig) -> tuple[int, int]:
    """Bytes one layer keeps for backward per token in bf16 (Korthikanti et al.'s count with
    flash attention, by each tensor's own width): (kept whole on every TP rank, split over TP).
    Whole: the two norms' inputs, the QKV and FC1 inputs, two dropout masks (10 h). Split: Q, K
    and V, the attention output, the FC1 output and the FC2 input; with equal widths and a
    plain 4h MLP that is Korthikanti's 24 h, but wide attention (Qwen3-32B: 8192 against a
    hidden size of 5120) and gated MLPs keep more."""
    h = m.hidden_size
    if m.multi_latent_attention:  # each head's query and key, value (Q, K, V as attention sees them)
        q_width = m.num_attention_heads * m.v_head_dim
        qkv = m.num_attention_heads * (2 * (m.qk_head_dim + m.qk_pos_emb_head_dim) + m.v_head_dim)
    else:
        head = m.kv_channels or h // m.num_attention_heads
        q_width = m.num_attention_heads * head
        qkv = q_width + 2 * (m.num_query_groups or m.num_attention_heads) * head
    gated = 2 if m.activation in GATED else 1
    widths = {m.ffn_hidden_size} if not all(moe_layers(m)) else set()
    if m.num_moe_experts:  # each token passes top-k experts (and the shared one)
        widths.add((m.moe_ffn_hidden_size or m.ffn_hidden_size) * m.moe_router_topk + (
            m.moe_shared_expert_intermediate_size or 0))
    ffn = max(widths)  # the widest kind of layer (dense or MoE)
    split = 2 * qkv + 2 * q_width + 2 * gated * ffn + 2 * ffn
    return 10 * h, split


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU estimate (GiB) for the most loaded pipeline stage."""

    params_per_rank: int
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def _stage_split(cfg: Config, layout: Layout) -> str:
    """": 8 + 12 + 8 over the pipeline stages" where the stages are uneven."""
    par = cfg.parallel
    first, last = par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage
    if first is None and last is None:
        return ""
    stages = pipeline_stage_layers(cfg.model.num_layers, layout.pipeline_model_parallel_size,
                                   first, last)
    return f": {' + '.join(map(str, stages))} over the pipeline stages"


def memory_plan(cfg: Config, layout: Layout) -> MemoryPlan:
    m, prec = cfg.model, cfg.precision
    tp, pp = layout.tensor_model_parallel_size, layout.pipeline_model_parallel_size
    counts = count_parameters(m, layout.padded_vocab_size)
    par = cfg.parallel
    uneven = (par.num_layers_in_first_pipeline_stage, par.num_layers_in_last_pipeline_stage
              ) if pp == par.pipeline_model_parallel_size else ()
    stages = pipeline_stage_layers(m.num_layers, pp, *uneven) or [m.num_layers // pp] * pp
    layers_per_stage = max(stages)
    ep = layout.expert_model_parallel_size
    # Each stage's parameters on one rank (first stage: the embedding too; last: the final norm
    # and the output layer, a copy of a tied embedding), its routed experts split over TP and
    # EP; the most loaded stage counts (its experts on this rank: `experts`).
    loads = []
    for k, count in enumerate(stages):
        start = sum(stages[:k])
        params = counts.layers(start, count)
        if k == 0:
            params += counts.embedding + counts.position
        if k == len(stages) - 1:
            params += counts.final_norm + (counts.output if pp == 1 else
                                           counts.output or counts.embedding)
        sparse = count - sum(start <= i < start + count for i in counts.dense_layers)
        stage_experts = _expert_params(m) * (m.num_moe_experts or 0) * sparse // tp
        loads.append((params // tp - stage_experts + stage_experts // ep, stage_experts // ep))
    per_rank, experts = max(loads)
    half = prec.bf16 or prec.fp16
    weight_bytes = 2 if half else 4
    grad_bytes = 4 if prec.grad_reduce_in_fp32 or not half else 2
    # Adam: fp32 master copy (mixed precision only) + two moments.
    optim_bytes = (4 if half else 0) + (8 if cfg.optim.optimizer == "adam" else 4)
    optimizer = per_rank * optim_bytes
    if cfg.parallel.use_distributed_optimizer:  # sharded over the data-parallel (x CP) ranks;
        # an expert's over the ranks that hold it (DP x CP / EP)
        replicas = layout.data_parallel_size * layout.context_parallel_size
        optimizer = ((per_rank - experts) * optim_bytes / replicas
                     + experts * optim_bytes / max(replicas // ep, 1))
    # Activations per layer and micro-batch with flash attention; the first stage holds up to
    # PP micro-batches in flight under 1F1B.
    s, b = cfg.data.seq_length, cfg.stage.micro_batch_size
    s_local = s // layout.context_parallel_size
    replicated, split = _activation_bytes_per_token(m)
    per_token = (replicated + split) / tp if layout.sequence_parallel else replicated + split / tp
    act_layer = per_token * s_local * b
    in_flight = min(pp, layout.num_microbatches)
    logits = 4 * s_local * b * layout.padded_vocab_size / tp * 2
    activations = act_layer * layers_per_stage * in_flight + logits
    return MemoryPlan(
        params_per_rank=per_rank,
        weights=per_rank * weight_bytes / GIB,
        gradients=per_rank * grad_bytes / GIB,
        optimizer=optimizer / GIB,
        activations=activations / GIB,
    )


def checkpoint_bytes(cfg: Config, layout: Layout) -> float:
    """The size of one saved step: every parameter once, in its training precision, with the
    optimizer's state (fp32 master copy under mixed precision, Adam's two moments)."""
    params = count_parameters(cfg.model, layout.padded_vocab_size).total
    half = cfg.precision.bf16 or cfg.precision.fp16
    optimizer = (4 if half else 0) + (8 if cfg.optim.optimizer == "adam" else 4)
    return params * ((2 if half else 4) + optimizer)


def describe(cfg: Config, layout: Layout, steps_counted: bool = True) -> str:
    """The plan printed before a run starts (and by `dry_run=true`). `steps_counted`: False
    while stage.epochs still waits for the data to set stage.train_iters (a dry run)."""
    counts = count_parameters(cfg.model, layout.padded_vocab_size)
    memory = memory_plan(cfg, layout)
    tokens = cfg.stage.global_batch_size * cfg.data.seq_length
    fpt = flops_per_token(cfg.model, layout.padded_vocab_size, cfg.data.seq_length)
    unit = "GPU" if layout.device == "cuda" else "process"
    lines = [
        f"run          {cfg.name}  ({cfg.stage.name}, {cfg.precision.name}, {layout.device})",
        f"processes    {layout.world_size} = {layout.nnodes} node(s) x {layout.nproc_per_node}"
        f"  |  TP {layout.tensor_model_parallel_size}  PP {layout.pipeline_model_parallel_size}"
        + (f" (VPP {layout.virtual_pipeline_model_parallel_size})"
           if layout.virtual_pipeline_model_parallel_size else "")
        + f"  CP {layout.context_parallel_size}  EP {layout.expert_model_parallel_size}"
          f"  DP {layout.data_parallel_size}",
        f"model        {cfg.model.name}: {counts.total / 1e9:.3f} B parameters "
        f"({cfg.model.num_layers} layers{_stage_split(cfg, layout)}, "
        f"hidden {cfg.model.hidden_size}, "
        f"vocab {cfg.model.vocab_size} padded to {layout.padded_vocab_size})",
        f"batch        global {cfg.stage.global_batch_size} x seq {cfg.data.seq_length} = "
        f"{tokens:,} tokens/step; micro {cfg.stage.micro_batch_size}, "
        f"{layout.num_microbatches} micro-batches per step",
        (f"schedule     {cfg.stage.train_iters:,} steps = "
         f"{cfg.stage.train_iters * tokens / 1e9:.3g} B tokens" if steps_counted else
         f"schedule     stage.epochs={cfg.stage.epochs}: the steps are counted from the data "
         f"when the run starts")
        + (f" ({cfg.stage.epochs} epoch(s))" if cfg.stage.epochs and steps_counted else "")
        + f"; lr {cfg.optim.lr:g}, {cfg.optim.lr_warmup_iters:,} warm-up steps, "
        f"{cfg.optim.lr_decay_style} decay to {cfg.optim.min_lr:g}",
        f"compute      {fpt / 1e9:.2f} GFLOP/token, {fpt * tokens / 1e12:.1f} TFLOP/step",
        f"{'memory/' + unit:<13} weights {memory.weights:.2f} GiB + gradients {memory.gradients:.2f} "
        f"+ optimizer {memory.optimizer:.2f} + activations {memory.activations:.2f} "
        f"= {memory.total:.2f} GiB (estimate, {memory.params_per_rank / 1e6:.1f} M params/rank)",
        f"engine       {'Transformer Engine' if layout.use_transformer_engine else 'Megatron local'}"
        f" layers",
    ]
    return "\n".join(lines)
