"""The random-number states of one rank, saved in each checkpoint so that a resumed run draws the
same dropout masks as the run that never stopped (the same list Megatron-LM saves)."""

from __future__ import annotations

import random

import numpy as np
import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker


def capture() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "cpu": torch.get_rng_state(),
        # Megatron's tracker: the tensor-parallel streams (on CPU runs, CPU generator states).
        "tracker": {name: s.clone() for name, s in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(dict(state["tracker"]))
