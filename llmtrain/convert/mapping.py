"""How Hugging Face tensors become Megatron-Core tensors and back: rules and exact transforms.

A family (llmtrain.convert.families) lists rules: one Megatron parameter (its whole, unsharded
tensor under its global name, `{i}` standing for the layer and `{e}` for the expert of a
mixture-of-experts layer) made from one or more Hugging Face tensors by a transform. Every
transform is a pair of exact inverses built from reshapes, concatenations, slices and
transposes, so Hugging Face -> Megatron -> Hugging Face gives back bitwise-identical tensors. Slicing into TP shards and PP stages is not done here but by
`llmtrain.megatron.weights`, from the whole tensors.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from llmtrain.config.schema import ModelConfig


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says what to do."""


def head_counts(m: ModelConfig) -> tuple[int, int, int]:
    """(query heads, KV groups, head size)."""
    groups = m.num_query_groups or m.num_attention_heads
    return m.num_attention_heads, groups, m.kv_channels or m.hidden_size // m.num_attention_heads


class Transform:
    """Exact inverses between the Hugging Face tensors of a rule and one Megatron tensor."""

    def to_mcore(self, tensors: list[torch.Tensor], m: ModelConfig,
                 shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
        raise NotImplementedError


class Copy(Transform):
    def to_mcore(self, tensors, m, shape):
        return tensors[0]

    def to_hf(self, tensor, m):
        return [tensor]


class Vocabulary(Transform):
    """Embedding and output rows: Megatron pads the vocabulary to a multiple of
    make_vocab_size_divisible_by x TP; padding rows repeat the last real row (as Megatron-LM's
    converters do), and are cut off again on the way back."""

    def to_mcore(self, tensors, m, shape):
        rows = tensors[0]
        padding = shape[0] - rows.shape[0]
        if padding < 0:
            raise ConversionError(f"the checkpoint has {rows.shape[0]} vocabulary rows, more than "
                                  f"the {shape[0]} of the Megatron model: check model.vocab_size")
        return torch.cat([rows, rows[-1:].expand(padding, *rows.shape[1:])]) if padding else rows

    def to_hf(self, tensor, m):
        return [tensor[:m.vocab_size]]


class Concat(Transform):
    """Equal parts stacked along the output dimension (a gated MLP's [gate; up])."""

    def to_mcore(self, tensors, m, shape):
        return torch.cat(tensors, dim=0)

    def to_hf(self, tensor, m):
        return list(tensor.chunk(2, dim=0))


def _group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    heads, groups, size = head_counts(m)
    rest = q.shape[1:]
    per_group = heads // groups
    return torch.cat([q.reshape(groups, per_group, size, *rest), k.reshape(groups, 1, size, *rest),
                      v.reshape(groups, 1, size, *rest)], dim=1).reshape(-1, *rest)


def _ungroup_qkv(tensor: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
    heads, groups, size = head_counts(m)
    rest = tensor.shape[1:]
    per_group = heads // groups
    grouped = tensor.reshape(groups, per_group + 2, size, *rest)
    return [grouped[:, :per_group].reshape(-1, *rest), grouped[:, per_group].reshape(-1, *rest),
            grouped[:, per_group + 1].reshape(-1, *rest)]


class QKV(Transform):
    """Separate Q, K and V projections -> Megatron's fused one, laid out per KV group as
    [the group's query heads, its key head, its value head] (weights and biases alike)."""

    def to_mcore(self, tensors, m, shape):
        return _group_qkv(*tensors, m)

    def to_hf(self, tensor, m):
        return _ungroup_qkv(tensor, m)


class StackedQKV(Transform):
    """One fused tensor holding [all Q; all K; all V] (GPT-2) -> Megatron's grouped layout."""

    def to_mcore(self, tensors, m, shape):
        heads, groups, size = head_counts(m)
        q, k, v = tensors[0].split([heads * size, groups * size, groups * size], dim=0)
        return _group_qkv(q, k, v, m)

    def to_hf(self, tensor, m):
        return [torch.cat(_ungroup_qkv(tensor, m), dim=0)]


@dataclass(frozen=True)
class Transposed(Transform):
    """GPT-2's Conv1D stores [in, out]; Megatron's linear layers [out, in]."""

    inner: Transform = field(default_factory=Copy)

    def to_mcore(self, tensors, m, shape):
        return self.inner.to_mcore([t.t() for t in tensors], m, shape)

    def to_hf(self, tensor, m):
        return [t.t() for t in self.inner.to_hf(tensor, m)]


class Deinterleaved(Transform):
    """A gated unit's halves stored alternately along the output dimension (gpt-oss: row 2j the
    gate's j-th, row 2j + 1 the linear half's) -> Megatron's [gate; linear]."""

    def to_mcore(self, tensors, m, shape):
        return torch.cat([tensors[0][0::2], tensors[0][1::2]])

    def to_hf(self, tensor, m):
        gate, linear = tensor.chunk(2, dim=0)
        return [torch.stack([gate, linear], dim=1).reshape(tensor.shape)]


@dataclass(frozen=True)
class ExpertSlice(Transform):
    """Hugging Face tensors that hold every expert of a layer, stacked along their first
    dimension (gpt-oss): the Megatron tensor of expert `expert` is `inner` of its slices (read
    alone by `Mapping.to_mcore`, not the whole stack). The mapping stacks the slices again on
    the way back (`Mapping.to_hf`)."""

    inner: Transform = field(default_factory=Copy)
    expert: int = 0

    def to_mcore(self, tensors, m, shape):
        return self.inner.to_mcore(tensors, m, shape)

    def to_hf(self, tensor, m):
        return self.inner.to_hf(tensor, m)


@dataclass(frozen=True)
class Rule:
    """Megatron parameter `mcore` from the Hugging Face tensors `hf` ({i}: the layer number,
    {e}: the expert's), on the layers `layers` (None: every layer)."""

    mcore: str
    hf: tuple[str, ...]
    transform: Transform = field(default_factory=Copy)
    layers: Optional[tuple[int, ...]] = None


def on_layers(rules: list[Rule], layers: tuple[int, ...]) -> list[Rule]:
    """The rules of a kind of layer (the MoE or the dense ones of a model that has both)."""
    return [dataclasses.replace(rule, layers=layers) for rule in rules]


def linear(mcore: str, hf: str, bias: bool, transform: Optional[Transform] = None) -> list[Rule]:
    """A weight and, when the model has one, its bias."""
    transform = transform or Copy()
    rules = [Rule(f"{mcore}.weight", (f"{hf}.weight",), transform)]
    if bias:
        bias_transform = transform.inner if isinstance(transform, Transposed) else transform
        rules.append(Rule(f"{mcore}.bias", (f"{hf}.bias",), bias_transform))
    return rules


def norm(mcore: str, hf: str, m: ModelConfig) -> list[Rule]:
    """A normalisation layer: LayerNorm has a bias, RMSNorm does not."""
    return linear(mcore, hf, m.normalization == "LayerNorm")


def gated_mlp(mcore: str, hf: str, projections: tuple[str, str, str], bias: bool) -> list[Rule]:
    """A SwiGLU MLP (a dense one, an expert, a shared expert) whose Hugging Face projections are
    named (gate, up, down): Megatron's linear_fc1 holds [gate; up], linear_fc2 the down one."""
    gate, up, down = (f"{hf}.{p}" for p in projections)
    result = [Rule(f"{mcore}.linear_fc1.{kind}", (f"{gate}.{kind}", f"{up}.{kind}"), Concat())
              for kind in (("weight", "bias") if bias else ("weight",))]
    return result + linear(f"{mcore}.linear_fc2", down, bias)


@dataclass
class Mapping:
    """The rules of one family for one model, expanded over its layers."""

    rules: list[Rule]
    model: ModelConfig
    ignored: tuple[str, ...] = ()
    by_mcore: dict[str, Rule] = field(init=False)
    by_hf: dict[str, Rule] = field(init=False)
    # Slices of stacked experts' tensors on their way back: {Hugging Face name: {expert: slice}}.
    stacking: dict[str, dict[int, torch.Tensor]] = field(init=False)

    def __post_init__(self):
        self.by_mcore, self.by_hf, self.stacking = {}, {}, {}
        experts = range(self.model.num_moe_experts or 0)
        for rule in self.rules:
            layers = range(self.model.num_layers) if rule.layers is None else rule.layers
            places = ([{"i": i, "e": e} for i in layers for e in experts] if "{e}" in rule.mcore
                      else [{"i": i} for i in layers] if "{i}" in rule.mcore else [{}])
            for place in places:
                transform = rule.transform
                if isinstance(transform, ExpertSlice):
                    transform = dataclasses.replace(transform, expert=place["e"])
                self._add(Rule(rule.mcore.format(**place),
                               tuple(n.format(**place) for n in rule.hf), transform))

    def _add(self, rule: Rule) -> None:
        self.by_mcore[rule.mcore] = rule
        for name in rule.hf:
            self.by_hf[name] = rule

    def hf_names(self) -> list[str]:
        return list(self.by_hf)

    def is_ignored(self, hf_name: str) -> bool:
        return any(re.search(pattern, hf_name) for pattern in self.ignored)

    def rule(self, mcore_name: str) -> Rule:
        if mcore_name not in self.by_mcore:
            raise ConversionError(f"no Hugging Face tensor maps to the Megatron parameter "
                                  f"{mcore_name}: the model config has a feature the "
                                  f"{self.model.family} mapping does not cover")
        return self.by_mcore[mcore_name]

    def to_mcore(self, mcore_name: str, read: Callable[..., torch.Tensor],
                 shape: torch.Size) -> torch.Tensor:
        """`read(name)`: a Hugging Face tensor; `read(name, e)`: its slice e along the first
        dimension (one expert of a stacked tensor)."""
        rule = self.rule(mcore_name)
        stacked = isinstance(rule.transform, ExpertSlice)
        tensors = [read(name, rule.transform.expert) if stacked else read(name)
                   for name in rule.hf]
        tensor = rule.transform.to_mcore(tensors, self.model, shape)
        if tensor.shape != shape:
            raise ConversionError(f"{' + '.join(rule.hf)} give a tensor of shape "
                                  f"{list(tensor.shape)} for {mcore_name}, which has shape "
                                  f"{list(shape)} in the Megatron model: the checkpoint does not "
                                  f"match its config")
        return tensor

    def to_hf(self, mcore_name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The Hugging Face tensors of one Megatron tensor; an expert's slice of a stacked
        tensor is held until the layer's last expert completes it."""
        rule = self.rule(mcore_name)
        parts = dict(zip(rule.hf, rule.transform.to_hf(tensor, self.model)))
        if not isinstance(rule.transform, ExpertSlice):
            return parts
        done = {}
        for name, part in parts.items():
            slices = self.stacking.setdefault(name, {})
            slices[rule.transform.expert] = part
            if len(slices) == self.model.num_moe_experts:
                done[name] = torch.stack([slices[e] for e in sorted(slices)])
                del self.stacking[name]
        return done
