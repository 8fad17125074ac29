"""Typed config of `python -m llmtrain.convert` (conf/convert.yaml is merged onto it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from llmtrain.config.schema import LauncherConfig, ModelConfig

DIRECTIONS = ("hf_to_mcore", "mcore_to_hf", "megatron_to_mcore", "lora_to_peft")
DTYPES = ("fp32", "bf16", "fp16")

DEFAULT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Megatron-Core trains large language models with tensor, pipeline and data parallelism.",
]


@dataclass
class ConvertConfig:
    """One conversion: what into what, under which layout, verified how."""

    # hf_to_mcore: a Hugging Face folder into a Megatron-Core distributed checkpoint;
    # mcore_to_hf: back (from any llmtrain checkpoint folder);
    # megatron_to_mcore: a Megatron-LM checkpoint (iter_NNNNNNN/mp_rank_XX/model_optim_rng.pt or
    # release/) into a Megatron-Core distributed checkpoint;
    # lora_to_peft: a peft=lora run's adapters into a Hugging Face PEFT adapter folder (mcore_to_hf
    # of such a run merges them into the base: docs/lora.md).
    direction: str = "hf_to_mcore"
    input: str = MISSING
    # Required unless check_only=true.
    output: Optional[str] = None
    # model=<name> (conf/model/): must agree with the Hugging Face config (hf_to_mcore) or
    # describes a checkpoint that has no config.json (training checkpoints, Megatron-LM ones).
    model: Optional[ModelConfig] = None
    # Processes the conversion runs on (the checkpoint itself loads under any layout).
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # Mixtures of experts: each layer's experts split over this many processes (as many
    # data-parallel ones), each reading and writing its own.
    expert_model_parallel_size: int = 1
    # Format of the written weights: fp32 | bf16 | fp16; null: the format the input stores.
    dtype: Optional[str] = None
    # Run both models on the prompts and compare every layer's output and the logits.
    check: bool = True
    # Verify without writing anything (the report is printed).
    check_only: bool = False
    # Format the check computes in (fp32 | bf16 | fp16) and its tolerances; null: per format
    # (see llmtrain.convert.check.TOLERANCES).
    check_dtype: str = "fp32"
    max_rel_diff: Optional[float] = None
    min_cosine: Optional[float] = None
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    # Longest prompt, in tokens.
    check_max_tokens: int = 64
    # mcore_to_hf: where the tokenizer comes from when the input folder has none.
    tokenizer: Optional[str] = None
    # Largest safetensors file written (GB, as transformers' max_shard_size).
    max_shard_size_gb: float = 5.0
    seed: int = 1234
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def register() -> None:
    ConfigStore.instance().store(name="convert_schema", node=ConvertConfig)
