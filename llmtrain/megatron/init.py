"""Weight initialisation that gives the same model whatever the parallel layout.

Megatron draws each rank's weights from its own random stream, so the same seed gives another
model at PP=2 than at PP=1. Here every parameter is drawn at its full (unsharded) shape from a
generator seeded by (seed, the parameter's global name), and each rank keeps its own slice:
TP, PP, VPP, DP and EP layouts of one seed start from identical weights, which makes their loss
curves comparable and lets a run be resumed under another layout.
"""

from __future__ import annotations

import math
import zlib

import torch
from llmtrain.megatron.weights import global_names, is_gated, shard, tensor_group


def _kind(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    # A scalar head (reward model, critic) starts at 0: it scores every sequence alike, so a
    # fresh critic adds no noise to the first advantages.
    if leaf.endswith("bias") or name.startswith("scalar_head."):
        return "zeros"
    if "norm" in name:
        return "ones"
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return "scaled_normal"
    return "normal"


@torch.no_grad()
def initialize(chunks: list[torch.nn.Module], seed: int) -> None:
    """Fill every parameter of this rank's model chunks."""
    for chunk in chunks:
        config = chunk.config
        tp = tensor_group(chunk)
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
                shape[param.partition_dim] *= tp[0]
            generator = torch.Generator(device=param.device)
            generator.manual_seed(zlib.crc32(f"{seed}:{gname}".encode()))
            full = torch.empty(shape, dtype=torch.float32, device=param.device)
            full.normal_(0.0, scaled_std if kind == "scaled_normal" else std, generator=generator)
            param.copy_(shard(full, param, is_gated(chunk, gname), tp))
