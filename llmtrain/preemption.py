"""Preemption: on SIGTERM or SIGUSR1 (what Slurm sends before it kills or preempts a job) the run
saves at the next step boundary and exits with REQUEUE_EXIT_CODE, so it loses at most one step.

A signal handler only sets a flag: it may run in the middle of a collective, where nothing else
is safe. At each step boundary every rank all-reduces its flag (MAX), so all ranks stop after the
same step even when the signal reached them at different moments, or only some of them.

In a multi-process run the launcher process gets the signal too: `forward_to_workers` keeps it
alive, passes the signal on to the workers and lets it wait for them (torch elastic's own handler
would tear them down after 30 seconds instead).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from typing import Iterator, Optional

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Watcher:
    """Installed in each worker for the length of the training loop."""

    def __init__(self, enabled: bool, device: str):
        self.enabled = enabled
        self.device = device
        self.received: Optional[int] = None
        self._previous = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def agreed_signal(self) -> Optional[str]:
        """Collective, at a step boundary: the name of a signal any rank received, else None."""
        if not self.enabled:
            return None
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        return signal.Signals(value).name if value else None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Forwarded:
    """What the launcher process received while its workers ran."""

    received: Optional[int] = None


@contextlib.contextmanager
def forward_to_workers() -> Iterator[Forwarded]:
    """In the launcher process, around torch elastic: SIGTERM and SIGUSR1 go on to the worker
    processes, which save and exit with REQUEUE_EXIT_CODE; the launcher waits for them."""
    forwarded = Forwarded()

    def forward(signum, frame):
        forwarded.received = forwarded.received or signum
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    key = "TORCHELASTIC_SIGNALS_TO_HANDLE"
    saved_env = os.environ.get(key)
    # Torch elastic turns SIGTERM into an exception that kills the workers; leave SIGTERM to us.
    os.environ[key] = "SIGINT,SIGHUP,SIGQUIT"
    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        yield forwarded
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env
