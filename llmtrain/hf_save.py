"""checkpoint.save_hf: a Hugging Face folder of a saved step, beside the Megatron checkpoints (a
PEFT adapter folder for a peft=lora run).

It reuses the offline export (`python -m llmtrain.convert direction=mcore_to_hf`, with its
per-layer check against transformers) on the committed step, in a process of its own started by
global rank 0 while training goes on (the run's end waits for the last); the folder is written
under a temporary name and renamed into place, so a crash never leaves a half-written one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
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


class HFExports:
    """A run's checkpoint.save_hf exports of its committed steps: each runs in a process of its
    own, watched by global rank 0 from a thread while training goes on (the other ranks take no
    part); the next export, and `finish`, wait for it, and raise if it failed."""

    def __init__(self, save_dir: Optional[Path], say: Callable[[str], None],
                 adapters: bool = False):
        self.save_dir, self.say, self.adapters = save_dir, say, adapters
        self.rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self._running: Optional[threading.Thread] = None
        self._failure: Optional[str] = None

    def start(self, iteration: int) -> None:
        """Export committed step `iteration` in the background (rank 0)."""
        self.wait()
        if self.rank0:
            self._running = threading.Thread(target=self._export, args=(iteration,), daemon=True)
            self._running.start()

    def wait(self) -> None:
        if self._running is not None:
            self._running.join()
            self._running = None
        if self._failure:
            failure, self._failure = self._failure, None
            raise RuntimeError(failure)

    def finish(self, iteration: int) -> None:
        """Collective: export the last step and wait for it, every rank with rank 0."""
        self.start(iteration)
        self.wait()
        if dist.is_initialized():
            dist.barrier()

    def _export(self, iteration: int) -> None:
        final = hf_folder(self.save_dir, iteration)
        direction = "lora_to_peft" if self.adapters else "mcore_to_hf"
        try:
            failed = convert_into(final, f"direction={direction}",
                                  f"input={Path(self.save_dir) / f'iter_{iteration:07d}'}")
        except OSError as error:  # the converter could not even start
            failed = str(error)
        if failed:
            self._failure = f"checkpoint.save_hf: the export of step {iteration} failed ({failed}"
        else:
            self.say(f"saved the Hugging Face {'PEFT adapter ' if self.adapters else ''}folder "
                     f"{final}")
