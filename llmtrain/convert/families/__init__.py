"""Model families: each maps a Hugging Face architecture to llmtrain's ModelConfig and its weights
to Megatron-Core's, and back. One module per family; `FAMILIES` lists them all."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmtrain.config.schema import ModelConfig
from llmtrain.convert.mapping import ConversionError, Mapping, Rule


@dataclass(frozen=True)
class Family:
    """What one Hugging Face architecture needs for conversion."""

    name: str  # ModelConfig.family
    architecture: str  # the Hugging Face class (config.json "architectures")
    model_type: str  # config.json "model_type"
    # Checkpoints saved from the base model (GPT-2 and Bloom on the Hub) leave this prefix out.
    base_prefix: str
    # Attribute path of the decoder layers in the Hugging Face model (per-layer checks).
    layers: str
    # Hugging Face config -> ModelConfig fields; raises ConversionError on features it lacks.
    model_fields: Callable[[object], dict]
    # ModelConfig -> Hugging Face config object.
    hf_config: Callable[[ModelConfig], object]
    rules: Callable[[ModelConfig], list[Rule]]
    # Hugging Face tensors that hold nothing to convert (buffers some checkpoints carry).
    ignored: tuple[str, ...] = ()

    def mapping(self, m: ModelConfig) -> Mapping:
        return Mapping(self.rules(m), m, self.ignored)


def _all() -> list[Family]:
    from llmtrain.convert.families import bloom, falcon, glm, gpt2, llama

    return [llama.LLAMA, llama.MISTRAL, llama.QWEN2, gpt2.GPT2, bloom.BLOOM, falcon.FALCON,
            glm.GLM]


def supported() -> str:
    return ", ".join(f"{f.architecture} ({f.model_type})" for f in _all())


def by_name(name: str) -> Family:
    for family in _all():
        if family.name == name:
            return family
    raise ConversionError(f"model family {name!r} has no Hugging Face mapping; supported "
                          f"families: {', '.join(f.name for f in _all())}")


def for_hf_config(hf_config) -> Family:
    """The family of a Hugging Face config, by its model_type (then its architecture)."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    for family in _all():
        if family.model_type == model_type or family.architecture in architectures:
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
