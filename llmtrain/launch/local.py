"""Worker processes on this node, started the way torchrun does (torch.distributed elastic).

Every launcher ends here on each node: `launcher.env` is applied, the workers join the static
rendezvous of node 0 (`master_addr:master_port`), and this process supervises them. A
one-process run trains in the calling process unless asked to spawn: no second Python start-up.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import traceback
import uuid
from typing import Callable, Optional

from llmtrain.config.schema import Config
from llmtrain.config.validate import Layout
from llmtrain.launch import PREEMPTION_SIGNAL, REQUEUE_EXIT_CODE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def worker(cfg: Config, layout: Layout, entry: Optional[Callable] = None) -> dict:
    """Entry point of each worker: `entry(cfg, layout)`, training by default; a failure is printed
    with its rank before it propagates."""
    from llmtrain.train import train

    try:
        return (entry or train)(cfg, layout)
    except Exception:
        print(f"[rank {os.environ.get('RANK', '0')}] "
              + traceback.format_exc(), flush=True)
        raise


class PreemptionNotice:
    """While the workers run, the preemption signal only records that it came.

    Slurm sends it (`--signal=USR1@90`) to every process of the job step, so the workers get it
    too and stop at their next step boundary (llmtrain.train); this process must survive it to
    report that the job wants a requeue."""

    def __init__(self):
        self.received = False
        self._previous = None

    def _record(self, signum, frame) -> None:
        if not self.received:
            print(f"[llmtrain] {signal.Signals(signum).name}: preemption notice; the workers "
                  f"save and stop, then the job asks to be requeued", flush=True)
        self.received = True

    def __enter__(self) -> PreemptionNotice:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(PREEMPTION_SIGNAL, self._record)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(PREEMPTION_SIGNAL, self._previous)


def rendezvous_id(layout: Layout) -> str:
    """The key prefix of the rendezvous store: the same on every node of a job (as torchrun's
    default), unique per launch on one node so that sequential runs in a process never mix."""
    if layout.nnodes > 1:
        return os.environ.get("LLMTRAIN_RUN_ID", "llmtrain")
    return uuid.uuid4().hex[:8]


def launch(cfg: Config, layout: Layout, node_rank: int = 0, spawn: bool = False,
           entry: Optional[Callable] = None) -> dict:
    """Run this node's workers; return the summary of the rank that logged (else {}).

    `entry` (a picklable function of cfg and layout) replaces training, e.g. for checkpoint
    conversion. `spawn` starts a worker process even for a one-process run, so that this process
    stays free to supervise it. Exits with REQUEUE_EXIT_CODE when a worker asked for a requeue,
    or when the workers stopped after a preemption notice."""
    os.environ.update(cfg.launcher.env)
    port = cfg.launcher.master_port or free_port()
    if layout.world_size == 1 and not spawn:
        os.environ.update(MASTER_ADDR=cfg.launcher.master_addr, MASTER_PORT=str(port),
                          RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        return worker(cfg, layout, entry)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=layout.nnodes,
        max_nodes=layout.nnodes,
        nproc_per_node=layout.nproc_per_node,
        run_id=rendezvous_id(layout),
        rdzv_backend="static",
        rdzv_endpoint=f"{cfg.launcher.master_addr}:{port}",
        rdzv_configs={"rank": node_rank},
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    with PreemptionNotice() as notice:
        try:
            results = elastic_launch(config, worker)(cfg, layout, entry)
        except ChildFailedError as error:
            codes = {failure.exitcode for failure in error.failures.values()}
            if REQUEUE_EXIT_CODE in codes or notice.received:
                print(f"[llmtrain] the workers stopped to be requeued (exit status "
                      f"{REQUEUE_EXIT_CODE}); running the same command again resumes from the "
                      f"latest checkpoint", flush=True)
                raise SystemExit(REQUEUE_EXIT_CODE) from None
            rank, failure = error.get_first_failure()
            raise RuntimeError(f"worker rank {rank} failed (exit code {failure.exitcode}); "
                               f"its traceback is printed above") from None
    return next((r for r in results.values() if r), {})
