"""LoRA adapters on Megatron-Core's linear layers, sharded as their base weight is.

Each adapted linear layer `linear_x` gets a sibling module `linear_x_lora` whose output a forward
hook adds to the layer's: W x + (alpha / r) B A x, with the base W frozen. Megatron's fused
weights get one (A, B) pair per Hugging Face projection, so that every pair means what PEFT's
does: linear_qkv holds q, k and v (their outputs interleaved per query group as Megatron lays
them out), a gated linear_fc1 holds gate and up.

Under tensor parallelism a column-parallel layer (qkv, fc1) keeps A whole and splits B's rows
as its weight's; a row-parallel layer (proj, fc2) splits A's columns and keeps B whole. A whole
parameter's gradient is summed over the TP group (an all-reduce of the low-rank activations'
gradient, or, under sequence parallelism, Megatron's own all-reduce of `sequence_parallel`
parameters).
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from llmtrain.config.schema import PeftConfig
from llmtrain.config.validate import LORA_LAYERS, lora_targets
from llmtrain.megatron.weights import global_names, shard, tensor_group

# The column-parallel layers a LoRA may target split their output.
COLUMN = ("linear_qkv", "linear_fc1")
SUFFIX = "_lora"
# A reward model's (stage=rm) scalar head: new, so it trains and is saved beside the adapters.
HEAD = "scalar_head."


class LoraAdapter(torch.nn.Module):
    """The adapter of one linear layer: parameters A_<part> [r, in] and B_<part> [out, r]."""

    def __init__(self, base: torch.nn.Module, target: str, parent: torch.nn.Module,
                 peft: PeftConfig, config, tp_group):
        super().__init__()
        self.column = target in COLUMN
        self.scale = peft.lora_alpha / peft.r
        self.dropout = torch.nn.Dropout(peft.lora_dropout) if peft.lora_dropout else None
        self.sequence_parallel = bool(config.sequence_parallel)
        self.tp_group = tp_group
        self.enabled = True
        # A Transformer Engine layer may normalise its input itself (a tuple: not a submodule).
        self.base = (base,)
        out_local, in_local = base.weight.shape
        if target == "linear_qkv":
            d = parent.hidden_size_per_attention_head
            self.groups = parent.num_query_groups_per_partition
            heads = parent.num_attention_heads_per_partition
            outs = {"q": heads * d, "k": self.groups * d, "v": self.groups * d}
        elif target == "linear_fc1" and config.gated_linear_unit:
            outs = {"gate": out_local // 2, "up": out_local // 2}
        else:
            outs = {target.removeprefix("linear_"): out_local}
        self.parts = tuple(outs)
        ref = base.weight
        for part, out in outs.items():
            a = torch.nn.Parameter(torch.empty(peft.r, in_local, device=ref.device, dtype=ref.dtype))
            b = torch.nn.Parameter(torch.zeros(out, peft.r, device=ref.device, dtype=ref.dtype))
            split = b if self.column else a
            split.tensor_model_parallel, split.partition_dim = True, 0 if self.column else 1
            whole = a if self.column else b
            whole.sequence_parallel = self.sequence_parallel  # Megatron sums its grads over TP
            setattr(self, f"A_{part}", a)
            setattr(self, f"B_{part}", b)

    def pairs(self):
        return [(part, getattr(self, f"A_{part}"), getattr(self, f"B_{part}")) for part in self.parts]

    def compose(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The parts' outputs (last dim) in the base layer's output layout."""
        if self.parts == ("q", "k", "v"):
            lead = outputs[0].shape[:-1]
            grouped = [o.reshape(*lead, self.groups, -1) for o in outputs]
            return torch.cat(grouped, dim=-1).reshape(*lead, -1)
        return torch.cat(outputs, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _normed(self.base[0], x)
        if self.column and self.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, group=self.tp_group)
        if self.dropout is not None:
            x = self.dropout(x)
        outputs = []
        for _, a, b in self.pairs():
            h = F.linear(x, a)
            if self.column and not self.sequence_parallel:
                h = copy_to_tensor_model_parallel_region(h, group=self.tp_group)
            elif not self.column:
                h = (reduce_scatter_to_sequence_parallel_region(h, group=self.tp_group)
                     if self.sequence_parallel else
                     reduce_from_tensor_model_parallel_region(h, group=self.tp_group))
            outputs.append(F.linear(h, b))
        return self.compose(outputs) * self.scale

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """This rank's shard of (alpha / r) B A, in the base weight's layout."""
        return self.compose([(b.float() @ a.float()).t() for _, a, b in self.pairs()]).t() * self.scale

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        axis = {f"{'B' if self.column else 'A'}_{p}": 0 if self.column else 1 for p in self.parts}
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axis, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))


def _normed(base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the weight of a Transformer Engine LayerNorm+Linear layer multiplies (its norm is
    inside the layer): the adapter reads the same normalised input."""
    weight = getattr(base, "layer_norm_weight", None)
    if weight is None:
        return x
    if getattr(base, "zero_centered_gamma", False):
        weight = weight + 1
    if base.normalization == "RMSNorm":
        return F.rms_norm(x, (x.shape[-1],), weight, base.eps)
    return F.layer_norm(x, (x.shape[-1],), weight, base.layer_norm_bias, base.eps)


def _add_adapter_output(adapter: LoraAdapter):
    def hook(module, args, output):
        if not adapter.enabled:
            return output
        out, bias = output
        return out + adapter(args[0]).to(out.dtype), bias

    return hook


def adapters(chunks: list) -> list[LoraAdapter]:
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, LoraAdapter)]


def has_adapters(module: torch.nn.Module) -> bool:
    return any(isinstance(m, LoraAdapter) for m in module.modules())


def is_adapter_key(key: str) -> bool:
    """A parameter or checkpoint key of an adapter."""
    return any(f"{t}{SUFFIX}." in key for t in LORA_LAYERS)


def active(module: torch.nn.Module) -> bool:
    """Whether adapters add to the model's output (none merged or switched off)."""
    return any(a.enabled for a in adapters([module]))


def is_trained_key(key: str) -> bool:
    """A parameter or checkpoint key that a LoRA run trains and saves: an adapter's, or a
    scalar head's."""
    return is_adapter_key(key) or HEAD in key


def saved_part(model: torch.nn.Module, state: dict) -> dict:
    """A model's checkpointed state: the adapters (and a scalar head) alone when it has any
    (the base is frozen and stays where checkpoint.load has it)."""
    if not has_adapters(model):
        return state
    return {key: value for key, value in state.items() if is_trained_key(key)}


def in_base(model: torch.nn.Module, key: str) -> bool:
    """A state key that an adapter-only checkpoint leaves to the base model."""
    return has_adapters(model) and not is_trained_key(key)


@torch.no_grad()
def add_adapters(chunks: list, peft: PeftConfig, seed: int) -> int:
    """Freeze every weight but a scalar head's (stage=rm: it is new) and attach adapters to the
    targeted layers; return how many. A is
    drawn as PEFT draws it (Kaiming-uniform) at its whole shape from a generator seeded by its
    global name, so every layout starts alike; B starts at zero (the model is unchanged)."""
    wanted = lora_targets(peft)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            param.requires_grad_(name.startswith(HEAD))
        found = [(name, parent, leaf) for name, parent in chunk.named_modules()
                 for leaf in wanted if isinstance(getattr(parent, leaf, None), torch.nn.Module)]
        for name, parent, leaf in found:
            base = getattr(parent, leaf)
            adapter = LoraAdapter(base, leaf, parent, peft, chunk.config, chunk.tp_group)
            parent.add_module(leaf + SUFFIX, adapter)
            base.register_forward_hook(_add_adapter_output(adapter))
        names, tp = global_names(chunk), tensor_group(chunk)
        for local, param in chunk.named_parameters():
            if not is_adapter_key(local) or ".A_" not in local:
                continue
            shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= tp[0]
            generator = torch.Generator(device=param.device)
            generator.manual_seed(zlib.crc32(f"{seed}:{names[local]}".encode()))
            full = torch.empty(shape, dtype=torch.float32, device=param.device)
            bound = 1.0 / math.sqrt(shape[1])
            full.uniform_(-bound, bound, generator=generator)
            param.copy_(shard(full, param, False, tp))
    return len(adapters(chunks))


@contextlib.contextmanager
def adapters_disabled(chunks: list):
    """The base model alone (the reference of DPO, GRPO and PPO): no second copy of it."""
    found = adapters(chunks)
    for adapter in found:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter in found:
            adapter.enabled = True


@torch.no_grad()
def merge(chunks: list) -> None:
    """Add every adapter's (alpha / r) B A into its base weight and switch the adapter off: the
    model computes the same, with the base's layers alone (a merged export; generation)."""
    for adapter in adapters(chunks):
        weight = adapter.base[0].weight
        weight.copy_(weight.float() + adapter.delta())  # one rounding to the weight's format
        adapter.enabled = False
