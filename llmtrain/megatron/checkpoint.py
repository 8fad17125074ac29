"""Megatron-Core distributed checkpoints: save and load model, optimizer and schedule state.

Layout, as Megatron-LM writes it, so its users find their way around:

    <save>/iter_0000050/                    one dist_checkpointing folder per saved step
    <save>/latest_checkpointed_iteration.txt

A checkpoint is loadable under any other TP/PP/DP layout (dist_checkpointing reshards).
The pointer file is written only after every rank has finished, so a step without it
being moved is never resumed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

from llmtrain.megatron import parallel

TRACKER = "latest_checkpointed_iteration.txt"
# How the distributed optimizer lays out its state. "fully_reshardable" loads under any other
# TP/PP/DP layout (Megatron gathers each parameter's state once when saving); Megatron-Core
# 0.19.2 cannot load it back into torch's own Adam (no Transformer Engine or Apex: the CPU), where
# "dp_reshardable" is used, which allows changes of the data-parallel size only.
CONTENT_METADATA = {"distrib_optim_sharding_type":
                    "fully_reshardable" if HAVE_APEX_OR_TE else "dp_reshardable"}


def step_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str | os.PathLike) -> Optional[int]:
    """The last complete checkpoint under `root`, or None."""
    tracker = Path(root) / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    return 0 if text == "release" else int(text)


def unwrap(chunk):
    """The GPTModel inside DDP and mixed-precision wrappers (checkpoints hold its names)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _keys(model: list) -> list[str]:
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _model_state(model: list) -> dict:
    return {key: unwrap(chunk).sharded_state_dict() for key, chunk in zip(_keys(model), model)}


def _merged(model_state: dict) -> dict:
    merged = {}
    for value in model_state.values():
        merged.update(value)
    return merged


def _materialize_optimizer_state(optimizer) -> None:
    """torch's Adam creates its state at its first step, but Megatron's distributed optimizer
    reads that state (its step count) to build what it loads into: take one step of zero
    gradients first. Whatever it changes is overwritten by the load."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def save(root: str | os.PathLike, iteration: int, model: list, optimizer, scheduler,
         common: dict[str, Any]) -> Path:
    """Write step `iteration` collectively from every rank; return its folder. Without an
    optimizer (a converted model) only the weights are written."""
    target = step_dir(root, iteration)
    if parallel.rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    parallel.barrier()
    state = _model_state(model)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(_merged(state),
                                                          metadata=CONTENT_METADATA)
        state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state.update(common)
    dist_checkpointing.save(state, str(target), content_metadata=CONTENT_METADATA)
    parallel.barrier()
    if parallel.rank() == 0:
        tmp = Path(root) / f".{TRACKER}.tmp"
        tmp.write_text(str(iteration))
        os.replace(tmp, Path(root) / TRACKER)
    parallel.barrier()
    return target


def has_training_state(source: str | os.PathLike) -> bool:
    """Whether a checkpoint folder holds optimizer and schedule state (converted ones do not)."""
    return "scheduler" in dist_checkpointing.load_common_state_dict(str(source))


# Transformer Engine's per-module FP8 metadata: absent from checkpoints written by Megatron's local
# layers (CPU runs, conversions) and rebuilt by TE at its first step, so a weights-only load may
# go without it.
_REBUILT = "_extra_state"


def load(root: str | os.PathLike, iteration: int, model: list, optimizer, scheduler,
         weights_only: bool = False) -> dict[str, Any]:
    """Load step `iteration` into the given objects; return the common (non-tensor) state."""
    source = step_dir(root, iteration)
    state = _model_state(model)
    if weights_only:
        loaded, _, absent = dist_checkpointing.load(state, str(source),
                                                    strict=StrictHandling.RETURN_UNEXPECTED)
        lacking = sorted(k for k in absent if _REBUILT not in k)
        if lacking:
            raise RuntimeError(f"{source} lacks {len(lacking)} tensor(s) of this model, e.g. "
                               f"{', '.join(lacking[:5])}: was it written for another model= ?")
    else:
        if not has_training_state(source):
            raise RuntimeError(f"{source} holds weights only (a converted model): add "
                               f"checkpoint.finetune=true to start training from it")
        _materialize_optimizer_state(optimizer)
        metadata = dist_checkpointing.load_content_metadata(str(source)) or CONTENT_METADATA
        state["optimizer"] = optimizer.sharded_state_dict(_merged(state), is_loading=True,
                                                          metadata=metadata)
        loaded = dist_checkpointing.load(state, str(source))
    for key, chunk in zip(_keys(model), model):
        missing, unexpected = unwrap(chunk).load_state_dict(loaded.pop(key), strict=False)
        wrong = [k for k in missing if _REBUILT not in k] + list(unexpected)
        if wrong:
            raise RuntimeError(f"{source} does not match this model: {', '.join(wrong[:5])}")
    if not weights_only:
        optimizer.load_state_dict(loaded.pop("optimizer"))
        scheduler.load_state_dict(loaded.pop("scheduler"))
    else:
        loaded.pop("optimizer", None)
        loaded.pop("scheduler", None)
    torch.distributed.barrier()
    return loaded


def stored_tensors(source: str | os.PathLike) -> dict[str, tuple[list[int], torch.dtype]]:
    """{key: (whole shape, dtype)} of the tensors a checkpoint folder holds, read from its
    metadata only."""
    metadata = dist_checkpointing.load_tensors_metadata(str(source))
    return {key: (list(t.global_shape), t.dtype) for key, t in metadata.items()}
