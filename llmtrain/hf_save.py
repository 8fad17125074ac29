"""checkpoint.save_hf: a Hugging Face folder of a saved step, beside the Megatron checkpoints (a
PEFT adapter folder for a peft=lora run).

It reuses the offline export (`python -m llmtrain.convert direction=mcore_to_hf`, with its
per-layer check against transformers) on the committed step, in a process of its own started by
global rank 0 while the other ranks wait; the folder is written under a temporary name and
renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist

# What a launcher sets for the training processes; the export starts processes of its own.
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
              "MASTER_ADDR", "MASTER_PORT", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE")


def conversion_env() -> dict[str, str]:
    """This process's environment without its launcher's variables, for a conversion that starts
    processes of its own (TORCHELASTIC_USE_AGENT_STORE, say, would make it wait forever for a
    store of an agent that is not there)."""
    return {key: value for key, value in os.environ.items()
            if key not in LAUNCH_ENV and not key.startswith("TORCHELASTIC_")}


def convert_into(final: Path, *args: str, echo: Optional[Callable[[str], None]] = None
                 ) -> Optional[str]:
    """`python -m llmtrain.convert <args>` into a hidden folder beside `final`, renamed to
    `final` once it succeeded (its check passed): a failure never leaves a half-written
    folder. Its output lines go to `echo` as they come. None on success, else the output's end
    (the hidden folder removed)."""
    hidden = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(hidden, ignore_errors=True)
    tail: deque = deque(maxlen=40)
    with subprocess.Popen([sys.executable, "-m", "llmtrain.convert", *args, f"output={hidden}"],
                          env=conversion_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            tail.append(line)
            if echo is not None:
                echo(line)
    if process.returncode != 0:
        shutil.rmtree(hidden, ignore_errors=True)
        return f"exit status {process.returncode}:\n" + "".join(tail)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(hidden, final)
    return None


def hf_folder(save_dir: Path, iteration: int) -> Path:
    return Path(save_dir) / f"hf_iter_{iteration:07d}"


def save_hf(save_dir: Path, iteration: int, say: Callable[[str], None],
            adapters: bool = False) -> None:
    """Export step `iteration` of `save_dir` (committed) to hf_iter_NNNNNNN/ (collective): the
    whole model, or with `adapters` (peft=lora) a PEFT adapter folder for the Hugging Face base."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        final = hf_folder(save_dir, iteration)
        failed = convert_into(final, f"direction={'lora_to_peft' if adapters else 'mcore_to_hf'}",
                              f"input={Path(save_dir) / f'iter_{iteration:07d}'}")
        if failed:
            raise RuntimeError(f"checkpoint.save_hf: the export of step {iteration} failed "
                               f"({failed}")
        say(f"saved the Hugging Face {'PEFT adapter ' if adapters else ''}folder {final}")
    if dist.is_initialized():
        dist.barrier()
