"""Process groups: torch.distributed plus Megatron-Core's model-parallel groups."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from llmtrain.config.layout import Layout


def initialize(layout: Layout, seed: int, timeout_minutes: int = 30) -> None:
    """Join the process group the launcher set up (RANK, WORLD_SIZE, MASTER_* in the
    environment) and build TP/PP/CP/EP/DP groups; seed every generator."""
    if layout.device == "cpu":
        from llmtrain.megatron import cpu

        cpu.enable()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if layout.device == "cuda" else "gloo",
            timeout=timedelta(minutes=timeout_minutes),
        )
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        context_parallel_size=layout.context_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """The same seed on every rank; Megatron's tracker derives TP-distinct dropout streams."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    from llmtrain.megatron.checkpoint import stop_writer_process

    stop_writer_process()
    if dist.is_initialized():
        ps.destroy_model_parallel()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_logging_rank() -> bool:
    """The rank that sees the loss and reports: last pipeline stage, first of its TP/CP/DP groups."""
    return (ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0
            and ps.get_data_parallel_rank() == 0)


def data_parallel_rank() -> int:
    return ps.get_data_parallel_rank()


def barrier() -> None:
    dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank `src` to every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
