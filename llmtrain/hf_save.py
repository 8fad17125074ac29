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
from pathlib import Path
from typing import Callable

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


def hf_folder(save_dir: Path, iteration: int) -> Path:
    return Path(save_dir) / f"hf_iter_{iteration:07d}"


def save_hf(save_dir: Path, iteration: int, say: Callable[[str], None],
            adapters: bool = False) -> None:
    """Export step `iteration` of `save_dir` (committed) to hf_iter_NNNNNNN/ (collective): the
    whole model, or with `adapters` (peft=lora) a PEFT adapter folder for the Hugging Face base."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        final = hf_folder(save_dir, iteration)
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        process = subprocess.run(
            [sys.executable, "-m", "llmtrain.convert",
             f"direction={'lora_to_peft' if adapters else 'mcore_to_hf'}",
             f"input={Path(save_dir) / f'iter_{iteration:07d}'}", f"output={tmp}"],
            env=conversion_env(), capture_output=True, text=True)
        if process.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"checkpoint.save_hf: the export of step {iteration} failed:\n"
                               f"{process.stdout[-2000:]}\n{process.stderr[-2000:]}")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        say(f"saved the Hugging Face {'PEFT adapter ' if adapters else ''}folder {final}")
    if dist.is_initialized():
        dist.barrier()
