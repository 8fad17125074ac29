"""A Megatron-Core GPT model's forward for generation, on its own tensors, over a static KV cache
written through device-side indices: the decode step has fixed shapes, so it can be captured in
a CUDA graph (llmtrain.megatron.decode_engine).

Megatron-Core's static inference context writes the cache at Python-int offsets (a new graph for
every position) and its dynamic engine needs flash-attention's paged kernels, which the GPU image
cannot install. This module reads the model's parameters in place (no copy: a rollout sees every
optimizer step at once) and computes what Megatron's layers compute for the architectures it
covers, the pre-norm Llama shape: RMSNorm or LayerNorm, rotary positions (any fraction of the head,
interleaved or not, Llama 3 scaling, as the model's own RotaryEmbedding makes them), grouped-query
attention with or without QKV bias and Q/K norms, a gated or plain MLP of SiLU or GELU, tied or
untied output, and LoRA adapters that are switched on (llmtrain.megatron.lora), added to their
layers' products as the model's forward adds them, so a peft=lora rollout needs no merge. Anything else is `unsupported` and generates on Megatron-Core's own path
(llmtrain.megatron.inference.Engine), as does a model split over pipeline stages.

Under tensor parallelism each rank holds its shard as Megatron lays it out (its query groups'
QKV rows, its share of the MLP and of the vocabulary) and runs its share of every product; the
row-parallel outputs are summed over the TP group as Megatron's RowParallelLinear sums them, and
the logits gathered, so every rank samples the same tokens from the same whole logits.

Attention over the cache masks each row past its own position, so rows at different positions
share a step (continuous batching).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding


@dataclass
class _Norm:
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    eps: float
    rms: bool
    shift: float  # 1.0 for zero-centred gammas

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """In fp32, as Transformer Engine's norms compute, then back to the model's dtype."""
        w = self.weight.float() + self.shift
        if self.rms:
            y = F.rms_norm(x.float(), (x.size(-1),), w, self.eps)
        else:
            b = self.bias.float() if self.bias is not None else None
            y = F.layer_norm(x.float(), (x.size(-1),), w, b, self.eps)
        return y.to(x.dtype)


@dataclass
class _Layer:
    norm1: _Norm
    qkv_w: torch.Tensor
    qkv_b: Optional[torch.Tensor]
    q_norm: Optional[_Norm]
    k_norm: Optional[_Norm]
    proj_w: torch.Tensor
    proj_b: Optional[torch.Tensor]
    norm2: _Norm
    fc1_w: torch.Tensor
    fc1_b: Optional[torch.Tensor]
    fc2_w: torch.Tensor
    fc2_b: Optional[torch.Tensor]
    # LoRA adapters (switched on) of linear_qkv, linear_proj, linear_fc1, linear_fc2
    loras: dict


def _lora(adapter, x: torch.Tensor) -> torch.Tensor:
    """A LoRA adapter's addition to this rank's product of its layer, from the layer's (normed)
    input: its output shard for a column-parallel layer (A whole, B split), its partial sum for
    a row-parallel one (A split, B whole: the sum over TP of each rank's (x A_i) B is (x A) B)."""
    return adapter.compose([F.linear(F.linear(x, a), b) for _, a, b in adapter.pairs()]) \
        * adapter.scale


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], adapter
            ) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return y if adapter is None else y + _lora(adapter, x).to(y.dtype)


def _bias(module) -> Optional[torch.Tensor]:
    b = getattr(module, "bias", None)
    return b if isinstance(b, torch.Tensor) and b.numel() else None


def _plain(t) -> bool:
    """A parameter held as an ordinary tensor (not an FP8 or other subclass)."""
    return isinstance(t, torch.Tensor) and type(t) in (torch.Tensor, torch.nn.Parameter)


def unsupported(model: torch.nn.Module) -> Optional[str]:
    """Why this model cannot run here (None: it can)."""
    from megatron.core.transformer.identity_op import IdentityOp

    c = model.config
    if ps.get_pipeline_model_parallel_world_size() > 1:
        return "the model is split over pipeline stages (PP > 1)"
    # (Before the positions: multi-latent attention rotates them itself, with no model-wide
    # rotary embedding.)
    if c.num_moe_experts or c.multi_latent_attention:
        return "mixture-of-experts or multi-latent attention"
    if c.softmax_type != "vanilla":
        return f"an attention softmax of type {c.softmax_type} (attention sinks)"
    if c.glu_linear_offset or c.activation_func_clamp_value is not None:
        return "a gated unit with an offset or a clamp"
    if getattr(model, "position_embedding_type", None) != "rope" or \
            type(getattr(model, "rotary_pos_emb", None)) is not RotaryEmbedding:
        return "positions other than rotary embeddings (learned, ALiBi, YaRN)"
    if c.window_size is not None:
        return "sliding-window attention"
    if c.activation_func not in (F.silu, F.gelu) or c.apply_residual_connection_post_layernorm \
            or c.fp32_residual_connection:
        return "an activation or residual layout other than pre-norm SiLU/GELU"
    if hasattr(model.embedding, "layernorm"):
        return "an embedding norm"
    for layer in model.decoder.layers:
        if type(layer).__name__ != "TransformerLayer" or \
                not isinstance(getattr(layer.mlp, "linear_fc1", None), torch.nn.Module):
            return f"a layer of type {type(layer).__name__} or a fused MLP"
        if not isinstance(layer.self_attention.linear_qkv, torch.nn.Module):
            return "an attention without a fused QKV projection"
        for name in ("linear_qkv", "linear_proj"):
            if not _plain(getattr(layer.self_attention, name).weight):
                return "FP8 or quantized weights"
        if not isinstance(layer.pre_cross_attn_layernorm, IdentityOp):
            return "cross-attention"
    return None


def _norm(config, fused_linear, separate) -> _Norm:
    """A layer's norm: fused into the next linear layer (Transformer Engine) or a module."""
    rms = config.normalization == "RMSNorm"
    shift = 1.0 if config.layernorm_zero_centered_gamma else 0.0
    if getattr(fused_linear, "layer_norm_weight", None) is not None:
        return _Norm(fused_linear.layer_norm_weight, getattr(fused_linear, "layer_norm_bias", None),
                     config.layernorm_epsilon, rms, shift)
    return _Norm(separate.weight, _bias(separate), config.layernorm_epsilon, rms, shift)


def _head_norm(config, module) -> Optional[_Norm]:
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    return _Norm(weight, _bias(module), config.layernorm_epsilon,
                 config.normalization == "RMSNorm", 0.0)


class KVModel:
    """The model's tensors and the forward of generation over a KV cache of `max_batch_size`
    rows x `max_sequence_length` positions (allocated once)."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_sequence_length: int,
                 compile: bool = False):
        c = model.config
        self.config = c
        self.dtype = model.embedding.word_embeddings.weight.dtype
        self.device = model.embedding.word_embeddings.weight.device
        self.tp = ps.get_tensor_model_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group() if self.tp > 1 else None
        # This rank's attention heads and query groups (Megatron shards QKV by whole groups).
        self.heads = c.num_attention_heads // self.tp
        self.groups = (c.num_query_groups or c.num_attention_heads) // self.tp
        # The first vocabulary id of this rank's rows of the embedding (and of the output layer).
        self.vocab_start = getattr(model.embedding.word_embeddings, "vocab_start_index", 0)
        self.head_dim = c.kv_channels
        self.scale = c.softmax_scale or self.head_dim ** -0.5
        self.gated = c.gated_linear_unit
        self.activation = c.activation_func
        self.embedding = model.embedding.word_embeddings.weight
        self.output = model.shared_embedding_or_output_weight() \
            if model.share_embeddings_and_output_weights else model.output_layer.weight
        self.final_norm = _norm(c, None, model.decoder.final_layernorm)
        self.layers = []
        for layer in model.decoder.layers:
            a, m = layer.self_attention, layer.mlp
            loras = {name: adapter for name, adapter in (
                (name, getattr(parent, f"{name}_lora", None)) for parent, name in
                ((a, "linear_qkv"), (a, "linear_proj"), (m, "linear_fc1"), (m, "linear_fc2")))
                if adapter is not None and adapter.enabled}
            self.layers.append(_Layer(
                _norm(c, a.linear_qkv, layer.input_layernorm), a.linear_qkv.weight,
                _bias(a.linear_qkv), _head_norm(c, a.q_layernorm), _head_norm(c, a.k_layernorm),
                a.linear_proj.weight, _bias(a.linear_proj),
                _norm(c, m.linear_fc1, layer.pre_mlp_layernorm), m.linear_fc1.weight,
                _bias(m.linear_fc1), m.linear_fc2.weight, _bias(m.linear_fc2), loras))
        rotary = model.rotary_pos_emb
        with torch.no_grad():
            freqs = rotary.get_freqs_non_repeated(max_sequence_length).float().to(self.device)
        self.rotary_interleaved = rotary.rotary_interleaved
        self.cos, self.sin = freqs.cos(), freqs.sin()  # [positions, rotary dim / 2]
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        # One tensor per layer: each is a whole allocation, so one compiled layer step fits all.
        # One position more than a sequence uses: a span (at most max_sequence_length) is then
        # never the cache's whole length, a case the compiler would specialise and recompile.
        shape = (max_batch_size, self.groups, max_sequence_length + 1, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                     for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                       for _ in self.layers]
        # Eager, a decode step is some fifty small kernels a layer, and at small batches their
        # launches, not the weights' reads, bound it; compiled (Triton), the norms, rotations,
        # masking and activations fuse around the matrix products. One compilation serves every
        # layer, row count and span (dynamic shapes). Under TP the sums over the group stay
        # outside compiled code: the layer's two halves between them compile instead.
        self._layer_step = self._decode_layer
        if compile and self.tp == 1:
            self._layer_step = torch.compile(self._decode_layer, dynamic=True)
        elif compile:
            self._attention = torch.compile(self._attention, dynamic=True)
            self._mlp = torch.compile(self._mlp, dynamic=True)

    # Pieces ---------------------------------------------------------------------------------

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary positions on [..., heads, head_dim] at `positions` (the shape of x[..., 0, 0]),
        as Megatron's apply_rotary_pos_emb: the first rotary dims, cos/sin in the model's dtype."""
        half = self.cos.size(-1)
        cos = self.cos[positions].to(x.dtype).unsqueeze(-2)  # [..., 1, half]
        sin = self.sin[positions].to(x.dtype).unsqueeze(-2)
        rot, rest = x[..., :2 * half], x[..., 2 * half:]
        if self.rotary_interleaved:
            cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        else:
            cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
            x1, x2 = rot.chunk(2, dim=-1)
            rotated = torch.cat((-x2, x1), dim=-1)
        return torch.cat((rot * cos + rotated * sin, rest), dim=-1)

    def _qkv(self, layer: _Layer, h: torch.Tensor, positions: torch.Tensor):
        """q [..., heads, d], k and v [..., groups, d], normed and rotated as Megatron does."""
        qkv = _linear(layer.norm1(h), layer.qkv_w, layer.qkv_b, layer.loras.get("linear_qkv"))
        per_group = self.heads // self.groups
        qkv = qkv.view(*h.shape[:-1], self.groups, per_group + 2, self.head_dim)
        q = qkv[..., :per_group, :].flatten(-3, -2)
        k, v = qkv[..., per_group, :], qkv[..., per_group + 1, :]
        if layer.q_norm is not None:
            q = layer.q_norm(q)
        if layer.k_norm is not None:
            k = layer.k_norm(k)
        return self._rotate(q, positions), self._rotate(k, positions), v

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the MLP's output (before the sum over TP and fc2's bias)."""
        h = _linear(layer.norm2(x), layer.fc1_w, layer.fc1_b, layer.loras.get("linear_fc1"))
        if self.gated:  # each rank's fc1 rows are its share of the gate, then of the up
            gate, up = h.chunk(2, dim=-1)
            h = self.activation(gate) * up
        else:
            h = self.activation(h)
        return _linear(h, layer.fc2_w, None, layer.loras.get("linear_fc2"))

    def _row_sum(self, partial: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """A row-parallel layer's output: the ranks' partial products summed, then its bias,
        as Megatron's RowParallelLinear adds it."""
        if self.tp > 1:
            dist.all_reduce(partial, group=self.tp_group)
        return partial if bias is None else partial + bias

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tokens' embeddings; under TP each rank looks up the ids of its vocabulary rows
        (zeros for the others) and the sum over the group is the whole lookup."""
        if self.tp == 1:
            return F.embedding(tokens, self.embedding)
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.embedding.size(0))
        x = F.embedding(local.masked_fill(outside, 0), self.embedding)
        x = x.masked_fill(outside[..., None], 0)
        dist.all_reduce(x, group=self.tp_group)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits over the whole (padded) vocabulary, on every rank."""
        local = F.linear(self.final_norm(x), self.output)
        if self.tp == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.contiguous(), group=self.tp_group)
        return torch.cat(parts, dim=-1)

    # Prefill ----------------------------------------------------------------------------------

    def prefill(self, slots: torch.Tensor, tokens: torch.Tensor, want_logits: bool
                ) -> Optional[torch.Tensor]:
        """Rows `slots` [n] of the cache from their prompts `tokens` [n, length] (right-padded:
        padding comes after every real token, so causal attention never reads it for them);
        the logits of every position [n, length, padded vocab] when `want_logits`."""
        n, length = tokens.shape
        positions = torch.arange(length, device=tokens.device).expand(n, length)
        x = self._embed(tokens)
        per_group = self.heads // self.groups
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, positions)  # [n, length, heads|groups, d]
            self.keys[i][slots, :, :length] = k.transpose(1, 2)
            self.values[i][slots, :, :length] = v.transpose(1, 2)
            # Each group's keys repeated for its query heads: the fused kernels then apply.
            attn = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.repeat_interleave(per_group, 2).transpose(1, 2),
                v.repeat_interleave(per_group, 2).transpose(1, 2), is_causal=True,
                scale=self.scale)
            attn = attn.transpose(1, 2).reshape(n, length, -1)
            x = x + self._row_sum(_linear(attn, layer.proj_w, None,
                                          layer.loras.get("linear_proj")), layer.proj_b)
            x = x + self._row_sum(self._mlp(layer, x), layer.fc2_b)
        return self.logits(x) if want_logits else None

    # Decode -----------------------------------------------------------------------------------

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, span: int) -> torch.Tensor:
        """One position for cache rows 0..n-1: `tokens` [n] at `positions` [n] (each row its
        own); their keys and values are written at those positions, attention reads the first
        `span` positions of each row up to its own. Returns the logits [n, padded vocab].
        Fixed shapes and no host synchronisation: capturable in a CUDA graph."""
        n = tokens.size(0)
        x = self._embed(tokens)  # [n, hidden]
        visible = torch.arange(span, device=tokens.device)[None, :] <= positions[:, None]
        mask = torch.zeros(n, 1, 1, span, dtype=torch.float32, device=tokens.device)
        mask.masked_fill_(~visible[:, None, None, :], float("-inf"))
        for i, layer in enumerate(self.layers):
            x = self._layer_step(layer, x, positions, mask, self.keys[i], self.values[i])
        return self.logits(x)

    def _decode_layer(self, layer: _Layer, x: torch.Tensor, positions: torch.Tensor,
                      mask: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                      ) -> torch.Tensor:
        """One layer of the decode step for rows 0..n-1 (n = x's rows)."""
        x = x + self._row_sum(self._attention(layer, x, positions, mask, keys, values),
                              layer.proj_b)
        return x + self._row_sum(self._mlp(layer, x), layer.fc2_b)

    def _attention(self, layer: _Layer, x: torch.Tensor, positions: torch.Tensor,
                   mask: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
                   ) -> torch.Tensor:
        """Rows 0..n-1 write their keys and values at their positions and attend over the
        first `span` (the mask's width) of their row; this rank's share of the output
        projection (before the sum over TP and its bias)."""
        n, span = x.size(0), mask.size(-1)
        rows = torch.arange(n, device=x.device)
        per_group = self.heads // self.groups
        q, k, v = self._qkv(layer, x, positions)  # q [n, heads, d], k/v [n, groups, d]
        keys[rows, :, positions] = k
        values[rows, :, positions] = v
        keys, values = keys[:n, :, :span], values[:n, :, :span]  # [n, groups, span, d]
        q = q.view(n, self.groups, per_group, self.head_dim)
        scores = torch.matmul(q, keys.transpose(-1, -2)).float() * self.scale + mask
        probs = torch.softmax(scores, dim=-1).to(values.dtype)  # [n, groups, per_group, span]
        attn = torch.matmul(probs, values).reshape(n, -1)
        return _linear(attn, layer.proj_w, None, layer.loras.get("linear_proj"))
