"""Weight initialisation that gives the same model whatever the parallel layout.

Megatron draws each rank's weights from its own random stream, so the same seed gives another
model at PP=2 than at PP=1. Here every parameter is drawn at its full (unsharded) shape from a
generator seeded by (seed, the parameter's global name), and each rank keeps its own slice:
TP, PP, VPP, DP and EP layouts of one seed start from identical weights, which makes their loss
curves comparable and lets a run be resumed under another layout.
"""

from __future__ import annotations

import math
import re
import zlib

import torch
from megatron.core import parallel_state as ps

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"local_experts\.(\d+)\.")


def global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """Map each local parameter name to its name in the whole (unsplit) model."""
    layers = chunk.decoder.layers
    num_local_experts = None
    names = {}
    for name, _ in chunk.named_parameters():
        gname = name
        match = _LAYER.search(name)
        if match:
            layer = layers[int(match.group(1))]
            gname = gname.replace(match.group(0), f"decoder.layers.{layer.layer_number - 1}.", 1)
        match = _EXPERT.search(gname)
        if match:
            if num_local_experts is None:
                num_local_experts = (chunk.config.num_moe_experts
                                     // ps.get_expert_model_parallel_world_size())
            expert = ps.get_expert_model_parallel_rank() * num_local_experts + int(match.group(1))
            gname = gname.replace(match.group(0), f"local_experts.{expert}.", 1)
        if gname == "output_layer.weight" and chunk.share_embeddings_and_output_weights:
            gname = "embedding.word_embeddings.weight"
        names[name] = gname
    return names


def _kind(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf.endswith("bias"):
        return "zeros"
    if "norm" in name:
        return "ones"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "scaled_normal"
    return "normal"


def _shard(full: torch.Tensor, param: torch.Tensor, gated: bool) -> torch.Tensor:
    """This TP rank's slice of a full tensor, as Megatron lays it out."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    if gated and dim == 0:
        # Gated MLP input: each rank holds [its slice of the gate; its slice of the up projection].
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[rank], up.chunk(tp, dim=0)[rank]], dim=0)
    return full.chunk(tp, dim=dim)[rank]


@torch.no_grad()
def initialize(chunks: list[torch.nn.Module], seed: int) -> None:
    """Fill every parameter of this rank's model chunks."""
    for chunk in chunks:
        config = chunk.config
        tp = ps.get_tensor_model_parallel_world_size()
        std = config.init_method_std
        scaled_std = std / math.sqrt(2.0 * config.num_layers)
        names = global_names(chunk)
        for name, param in chunk.named_parameters():
            gname = names[name]
            kind = _kind(gname)
            if kind == "zeros":
                param.zero_()
                continue
            if kind == "ones":
                param.fill_(1.0)
                continue
            shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= tp
            generator = torch.Generator(device=param.device)
            generator.manual_seed(zlib.crc32(f"{seed}:{gname}".encode()))
            full = torch.empty(shape, dtype=torch.float32, device=param.device)
            full.normal_(0.0, scaled_std if kind == "scaled_normal" else std, generator=generator)
            gated = config.gated_linear_unit and gname.endswith("linear_fc1.weight")
            param.copy_(_shard(full, param, gated))
