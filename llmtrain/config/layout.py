"""What a run is laid out on: the machine a node offers, and the process layout that validation
resolves from the config and the machine (llmtrain.config.validate), which the launcher and
every worker share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Machine:
    """What this node offers; filled in by `llmtrain.runtime.detect_machine()`."""

    gpus: int = 0
    has_transformer_engine: bool = False
    # CUDA compute capability of the GPUs, e.g. (9, 0) for Hopper.
    gpu_capability: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Layout:
    """The resolved process layout, shared by the launcher and every worker."""

    device: str
    nnodes: int
    nproc_per_node: int
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    virtual_pipeline_model_parallel_size: int | None
    context_parallel_size: int
    expert_model_parallel_size: int
    data_parallel_size: int
    num_microbatches: int
    padded_vocab_size: int
    use_transformer_engine: bool
    sequence_parallel: bool

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node
