"""Preemption: on SIGTERM or SIGUSR1 (what Slurm sends before it kills or preempts a job) the run
saves at the next step boundary and exits with REQUEUE_EXIT_CODE, so it loses at most one step.

A signal handler only sets a flag: it may run in the middle of a collective, where nothing else
is safe. At each step boundary every rank all-reduces its flag (MAX), so all ranks stop after the
same step even when the signal reached them at different moments, or only some of them.

In a multi-process run the launcher process records the signals, passes them on to its workers
and waits for them (llmtrain.launch.local.PreemptionNotice).
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

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
