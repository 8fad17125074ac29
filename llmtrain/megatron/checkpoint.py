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
    """Write step `iteration` collectively from every rank; return its folder."""
    target = step_dir(root, iteration)
    if parallel.rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
    parallel.barrier()
    state = _model_state(model)
    state["optimizer"] = optimizer.sharded_state_dict(_merged(state), metadata=CONTENT_METADATA)
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


def load(root: str | os.PathLike, iteration: int, model: list, optimizer, scheduler,
         weights_only: bool = False) -> dict[str, Any]:
    """Load step `iteration` into the given objects; return the common (non-tensor) state."""
    source = step_dir(root, iteration)
    state = _model_state(model)
    if not weights_only:
        _materialize_optimizer_state(optimizer)
        metadata = dist_checkpointing.load_content_metadata(str(source)) or CONTENT_METADATA
        state["optimizer"] = optimizer.sharded_state_dict(_merged(state), is_loading=True,
                                                          metadata=metadata)
    loaded = dist_checkpointing.load(state, str(source))
    for key, chunk in zip(_keys(model), model):
        unwrap(chunk).load_state_dict(loaded.pop(key), strict=True)
    if not weights_only:
        optimizer.load_state_dict(loaded.pop("optimizer"))
        scheduler.load_state_dict(loaded.pop("scheduler"))
    else:
        loaded.pop("optimizer", None)
        loaded.pop("scheduler", None)
    torch.distributed.barrier()
    return loaded
