"""Process-level helpers shared by the launcher and the workers (no Megatron imports)."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings

from llmtrain.config.layout import Machine


# The caching allocator grows its blocks in place instead of leaving fragments: Llama 3.2 1B
# at micro batch 8, sequence 4096 fits in 80 GB only so (docs/performance.md). A user's own
# PYTORCH_CUDA_ALLOC_CONF wins.
CUDA_ALLOC_CONF = "expandable_segments:True"


def detect_machine() -> Machine:
    """GPUs on this node, their compute capability, and whether Transformer Engine is installed.

    This is every tool's first touch of CUDA, so it also sets the allocator's default (torch
    reads PYTORCH_CUDA_ALLOC_CONF once, when CUDA starts; worker processes inherit it)."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    has_te = importlib.util.find_spec("transformer_engine") is not None
    capability = torch.cuda.get_device_capability(0) if gpus else None
    return Machine(gpus=gpus, has_transformer_engine=has_te, gpu_capability=capability)


def quiet_libraries() -> None:
    """Megatron and torch warn at import about optional packages a CPU run does not need;
    keep the console for what the user must read. LLMTRAIN_VERBOSE=1 shows everything."""
    if os.environ.get("LLMTRAIN_VERBOSE") == "1":
        return
    warnings.filterwarnings("ignore", module=r"megatron\.")
    warnings.filterwarnings("ignore", message=r".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("megatron", "torch.utils.cpp_extension", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def sync_device(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def stop_resource_tracker() -> None:
    """multiprocessing's resource tracker, started by this process, outlives it by a moment, and
    under a PID 1 that reaps no orphans (a container without an init) stays a defunct process in
    the command's group: stopped and waited for once no child process is left that shares it."""
    import multiprocessing
    from multiprocessing import resource_tracker

    tracker = resource_tracker._resource_tracker
    if tracker._pid is not None and not multiprocessing.active_children():
        tracker._stop()
