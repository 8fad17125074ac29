"""Whole (unsharded) tensors in and out of this rank's model chunks, under any TP/PP layout.

A parameter's whole tensor is what it would be in a one-process model; its global name is the one
`global_names` gives (layer numbers counted over the whole model, a tied output layer named as the
word embedding). Initialisation and checkpoint conversion work on whole tensors and leave
the slicing to `shard` and the gathering to `whole_tensors`.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
# A routed expert's parameter: SequentialMLP's (Megatron's local layers) and TEGroupedMLP's
# (Transformer Engine's grouped GEMM), numbered among this EP rank's experts.
_EXPERT = re.compile(r"local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


# Buffers that are weights: the router's expert bias (aux-loss-free balancing, DeepSeek-V3's
# e_score_correction_bias), learned by its own update rule instead of by gradients. They stay in
# fp32 whatever the precision: Megatron-Core's router keeps it so, Hugging Face stores it so, and
# the experts it picks hang on its small differences.
WEIGHT_BUFFERS = ("router.expert_bias",)


def is_weight_buffer(name: str) -> bool:
    return name.endswith(WEIGHT_BUFFERS)


def weight_buffers_in_fp32(chunk: torch.nn.Module) -> None:
    """Back to fp32 after a cast of the whole chunk (`chunk.to(bf16)`)."""
    for name, buffer in chunk.named_buffers():
        if is_weight_buffer(name):
            buffer.data = buffer.data.float()


def named_weights(chunk: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The chunk's parameters and the buffers that are weights, by their local names."""
    yield from chunk.named_parameters()
    for name, buffer in chunk.named_buffers():
        if is_weight_buffer(name):
            yield name, buffer


def global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Map each local parameter (or weight buffer) name to its name in the whole model."""
    layers = chunk.decoder.layers
    num_local_experts = None
    names = {}
    for name, _ in named_weights(chunk):
        gname = name
        match = _LAYER.search(name)
        if match:
            layer = layers[int(match.group(1))]
            gname = gname.replace(match.group(0), f"decoder.layers.{layer.layer_number - 1}.", 1)
        if _EXPERT.search(gname) or _GROUPED_EXPERT.search(gname):
            if num_local_experts is None:
                num_local_experts = (chunk.config.num_moe_experts
                                     // ps.get_expert_model_parallel_world_size())
            gname = expert_name(gname, ps.get_expert_model_parallel_rank() * num_local_experts)
        if gname == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
            gname = "embedding.word_embeddings.weight"
        names[name] = gname
    return names


def expert_name(name: str, first: int) -> str:
    """An expert's parameter under its whole-model name, the same for both expert layouts:
    `experts.local_experts.{e}.linear_fc1.weight`, e counted over all experts (`first`: the
    number of this rank's first expert). TEGroupedMLP's `experts.linear_fc1.weight{k}` is
    SequentialMLP's expert k, as Megatron-Core's checkpoints store it."""
    grouped = _GROUPED_EXPERT.search(name)
    if grouped:
        layer, kind, local = grouped.groups()
        return name[:grouped.start()] + f"experts.local_experts.{first + int(local)}.{layer}.{kind}"
    local = _EXPERT.search(name)
    return name.replace(local.group(0), f"local_experts.{first + int(local.group(1))}.", 1)


def is_gated(chunk: torch.nn.Module, global_name: str) -> bool:
    """The first MLP projection of a gated unit (SwiGLU) holds [gate; up]."""
    return chunk.config.gated_linear_unit and ".linear_fc1." in global_name


def tensor_group(chunk: torch.nn.Module) -> tuple[int, int]:
    """(size, this rank's place) of the tensor-parallel group the chunk was built with: the
    run's, or a role's own (llmtrain.megatron.align.placement)."""
    group = chunk.tp_group
    return dist.get_world_size(group), dist.get_rank(group)


def shard(full: torch.Tensor, param: torch.Tensor, gated: bool,
          tp: tuple[int, int]) -> torch.Tensor:
    """The slice of a whole tensor that TP rank `tp[1]` of `tp[0]` holds, as Megatron lays it
    out."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    tp, rank = tp
    if gated and dim == 0:
        # Gated MLP input: each rank holds [its slice of the gate; its slice of the up projection].
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=dim)[rank]


def _unshard(param: torch.Tensor, gated: bool, group) -> torch.Tensor:
    """The whole tensor from every TP rank's slice (a collective of the TP group)."""
    if not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    parts = [torch.empty_like(param) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, param.detach().contiguous(), group=group)
    dim = param.partition_dim
    if gated and dim == 0:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


@torch.no_grad()
def load_whole_tensors(chunks: list[torch.nn.Module],
                       whole: Callable[[str, torch.Size], torch.Tensor]) -> None:
    """Fill every parameter (and weight buffer) from `whole(global_name, whole_shape)`, one
    tensor at a time."""
    for chunk in chunks:
        names, tp = global_names(chunk), tensor_group(chunk)
        for name, param in named_weights(chunk):
            shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= tp[0]
            full = whole(names[name], torch.Size(shape))
            param.copy_(shard(full, param, is_gated(chunk, names[name]), tp))


@torch.no_grad()
def whole_tensors(chunks: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
    """(global name, whole tensor) of every parameter of this rank's chunks, gathered over its
    TP group; a tied output layer, a copy of the word embedding, is left out. Every rank of a TP
    group must iterate to the end (the gathers are collective)."""
    for chunk in chunks:
        names = global_names(chunk)
        for name, param in named_weights(chunk):
            if name != names[name] and name.startswith("output_layer."):
                continue
            yield names[name], _unshard(param, is_gated(chunk, names[name]), chunk.tp_group)


def is_first_of_tensor_group() -> bool:
    """The rank that writes what its TP group gathered (first TP, DP and CP rank of its stage)."""
    return (ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0)


def is_expert(global_name: str) -> bool:
    """A routed expert's parameter: held by its expert-parallel rank only."""
    return ".mlp.experts." in global_name


def writes(global_name: str) -> bool:
    """Whether this rank writes what it gathered of a parameter: the first rank of its TP group
    among the data-parallel copies; for an expert, among the copies on its EP rank (with expert
    parallelism the data-parallel ranks hold different experts)."""
    if is_expert(global_name):
        return (ps.get_expert_tensor_parallel_rank() == 0
                and ps.get_expert_data_parallel_rank() == 0)
    return is_first_of_tensor_group()


def expert_rank() -> int:
    return ps.get_expert_model_parallel_rank()


def pipeline_rank() -> int:
    return ps.get_pipeline_model_parallel_rank()


def tensor_rank() -> int:
    return ps.get_tensor_model_parallel_rank()


def gather_to_first(obj) -> list | None:
    """Every rank's `obj`, as a list on global rank 0 (None elsewhere)."""
    box = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, box, dst=0)
    return box
