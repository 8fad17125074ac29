"""Faults on purpose, for the reliability tests: nothing happens unless an LLMTRAIN_FAULT_*
environment variable asks for it. Never set these in a real run (docs/reliability.md).

LLMTRAIN_FAULT_SAVE=crash@STEP[:RANK] or stall@STEP[:RANK]
    While saving step STEP, on RANK (default 0), after the data files are written and before the
    step is committed: `crash` raises an OSError there (with async_save=true, the rank's
    background writer process dies instead, before it writes); `stall` sleeps there for an hour
    (the test kills the run).
LLMTRAIN_FAULT_NAN=grad@STEP[:RANK] or loss@STEP[:RANK]
    At step STEP, on RANK (default 0), just before the non-finite check: `grad` writes a NaN into
    the rank's first gradient, `loss` makes the rank's loss NaN (a rank of the last pipeline stage).
"""

from __future__ import annotations

import os
import time
from typing import Optional


def _fault(variable: str, iteration: int, rank: int) -> Optional[str]:
    """The kind of fault asked for at this step on this rank, if any."""
    value = os.environ.get(variable)
    if not value:
        return None
    try:
        kind, where = value.split("@")
        step, _, on_rank = where.partition(":")
        step, on_rank = int(step), int(on_rank or 0)
    except ValueError:
        raise ValueError(f"{variable}={value!r}: expected KIND@STEP or KIND@STEP:RANK") from None
    return kind if (step, on_rank) == (iteration, rank) else None


def save_fault(iteration: int, rank: int) -> Optional[str]:
    kind = _fault("LLMTRAIN_FAULT_SAVE", iteration, rank)
    if kind not in (None, "crash", "stall"):
        raise ValueError(f"LLMTRAIN_FAULT_SAVE: unknown fault {kind!r} (crash or stall)")
    return kind


def during_save(iteration: int, rank: int) -> None:
    """Called between writing a step's files and committing it."""
    kind = save_fault(iteration, rank)
    if kind == "crash":
        raise OSError(f"injected fault (LLMTRAIN_FAULT_SAVE) while saving step {iteration}")
    if kind == "stall":
        print(f"[llmtrain] fault: the save of step {iteration} stalls on rank {rank} "
              f"(LLMTRAIN_FAULT_SAVE)", flush=True)
        time.sleep(3600)


def crashing_writer(iteration: int):
    """The background writer of an async save, replaced by one that dies before writing."""

    def write(*args, **kwargs):
        raise OSError(f"injected fault (LLMTRAIN_FAULT_SAVE) in the writer of step {iteration}")

    return write


def poison(iteration: int, rank: int, model: list, reports: list[dict]) -> None:
    """Called on every rank right before the non-finite check of a step."""
    kind = _fault("LLMTRAIN_FAULT_NAN", iteration, rank)
    if kind == "grad":
        buffer = model[0].buffers[0].grad_data
        buffer.view(-1)[0] = float("nan")
    elif kind == "loss" and reports:
        reports[0]["lm loss"][0] = float("nan")
    elif kind is not None:
        raise ValueError(f"LLMTRAIN_FAULT_NAN: unknown fault {kind!r} (grad or loss)")
