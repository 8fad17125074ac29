"""A conversion as every worker process sees it: sent, pickled, to each of them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from llmtrain.config.schema import ModelConfig, PeftConfig
from llmtrain.convert.legacy import LegacyCheckpoint


@dataclass(frozen=True)
class Job:
    """What to convert, into what, and what to check."""

    direction: str
    input: str
    # None: verify only, write nothing.
    output: Optional[str]
    model: ModelConfig
    dtype: str  # format of the weights written
    check_dtype: Optional[str]  # None: no check
    sequences: list = field(default_factory=list)  # token ids of the prompts
    max_shard_bytes: int = 5 * 10**9
    legacy: Optional[LegacyCheckpoint] = None
    iteration: int = 0  # mcore_to_hf: the step read
    # mcore_to_hf: the prefix left out of the names written (a checkpoint that came without it).
    strip_prefix: str = ""
    # A LoRA adapter checkpoint's base step folder (llmtrain.convert.peft) and PEFT settings.
    base: Optional[str] = None
    peft: Optional[PeftConfig] = None
