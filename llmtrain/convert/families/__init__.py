"""Model families, one registered object each: what llmtrain knows about an architecture on both
sides, so that adding one is one module of this package.

A `Family` holds its defaults (the ModelConfig fields every member shares, the layer-spec
adjustments among them: `llmtrain.megatron.specs` builds the layers from those fields, since only
llmtrain.megatron imports Megatron-Core), the reading of a Hugging Face config, the Hugging Face
config it writes, the tensor mapping rules, its parameter count and its named sizes (the
`conf/model/` entries). A new family is one module here, named in MODULES; the rest of llmtrain
finds it by its name (`by_name`) or by a Hugging Face config (`for_hf_config`).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable

from llmtrain.config.plan import count_parameters
from llmtrain.config.schema import ModelConfig
from llmtrain.convert.mapping import ConversionError, Mapping, Rule


@dataclass(frozen=True)
class Family:
    """One architecture family, Megatron side and Hugging Face side."""

    name: str  # ModelConfig.family
    architecture: str  # the Hugging Face class (config.json "architectures")
    model_type: str  # config.json "model_type"
    # Checkpoints saved from the base model (GPT-2 and Bloom on the Hub) leave this prefix out.
    base_prefix: str
    # Attribute path of the decoder layers in the Hugging Face model (per-layer checks).
    layers: str
    # Hugging Face config -> the ModelConfig fields that vary between members (the defaults
    # below complete them); raises ConversionError on features it lacks.
    from_hf: Callable[[object], dict]
    # ModelConfig -> Hugging Face config object.
    hf_config: Callable[[ModelConfig], object]
    rules: Callable[[ModelConfig], list[Rule]]
    # ModelConfig fields every member has, layer-spec adjustments included (qk_layernorm,
    # parallel_attention_mlp, position_embedding_type=alibi, ...).
    defaults: dict = field(default_factory=dict)
    # The published sizes: conf/model/<size>.yaml entries of this family.
    sizes: tuple[str, ...] = ()
    # Hugging Face tensors that hold nothing to convert (buffers some checkpoints carry).
    ignored: tuple[str, ...] = ()
    # What Hugging Face layers past num_layers hold, skipped on import (DeepSeek-V3's
    # multi-token prediction); empty: a checkpoint has none.
    extra_layers: str = ""

    def model_fields(self, hf_config) -> dict:
        """ModelConfig fields (all but the name) of a Hugging Face config."""
        return {"family": self.name, **self.defaults, **self.from_hf(hf_config)}

    def mapping(self, m: ModelConfig) -> Mapping:
        return Mapping(self.rules(m), m, self.ignored)

    def parameters(self, m: ModelConfig) -> int:
        """Parameters as publishers count them: over the real vocabulary, Megatron's padding
        excluded."""
        return count_parameters(m, m.vocab_size).total


# The modules of this package that define families, in the order errors list them.
MODULES = ("llama", "gpt2", "bloom", "falcon", "glm", "qwen3", "mixtral", "qwen_moe",
           "deepseek", "gpt_oss", "glm_moe")


@cache
def registered() -> tuple[Family, ...]:
    """Every family: each `Family` defined at the top level of a module of MODULES."""
    found: dict[str, Family] = {}
    for module in MODULES:
        loaded = importlib.import_module(f"{__name__}.{module}")
        found.update((value.name, value) for value in vars(loaded).values()
                     if isinstance(value, Family))
    return tuple(found.values())


def supported() -> str:
    return ", ".join(f"{f.architecture} ({f.model_type})" for f in registered())


def by_name(name: str) -> Family:
    for family in registered():
        if family.name == name:
            return family
    raise ConversionError(f"model family {name!r} has no Hugging Face mapping; supported "
                          f"families: {', '.join(f.name for f in registered())}")


def for_hf_config(hf_config) -> Family:
    """The family of a Hugging Face config, by its model_type (then its architecture)."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    for family in registered():
        if family.model_type == model_type:
            return family
    for family in registered():
        if family.architecture in architectures:
            return family
    shown = architectures[0] if architectures else "?"
    raise ConversionError(f"architecture {shown} (model_type {model_type}) is not supported; "
                          f"supported architectures: {supported()}")


def unsupported(family: str, features: list[str]) -> None:
    """Raise one error naming every feature of a config that the mapping cannot carry."""
    if features:
        raise ConversionError(f"this {family} config uses what llmtrain cannot convert yet: "
                              + "; ".join(features))


def model_name(folder: Path) -> str:
    """A config name for a model without a conf/model entry, from its folder name."""
    return re.sub(r"[^0-9a-z]+", "_", folder.resolve().name.lower()).strip("_") or "converted"
