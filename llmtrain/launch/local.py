"""Worker processes on this node, started the way torchrun does (torch.distributed elastic).

Every launcher ends here on each node: `launcher.env` is applied, the workers join the static
rendezvous of node 0 (`master_addr:master_port`), and this process supervises them. A
one-process run trains in the calling process unless asked to spawn: no second Python start-up.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import sys
import threading
import traceback
import uuid
from typing import Callable, Optional

from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config
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


class Requeue(SystemExit):
    """The node's workers stopped to be run again (exit status REQUEUE_EXIT_CODE); `signals`:
    the notices this launcher received (none when a worker asked by itself)."""

    def __init__(self, signals: frozenset[int]):
        super().__init__(REQUEUE_EXIT_CODE)
        self.signals = signals


class PreemptionNotice:
    """While the workers run, the preemption signal and SIGTERM are recorded and passed on.

    Slurm sends them to every process of the job step, so the workers get them too and stop at
    their next step boundary, after saving (llmtrain.preemption); passing them on also reaches
    the workers when only this process was signalled (`kill PID`). This process must survive
    them to report that the job wants a requeue; torch elastic's own SIGTERM handler, which
    would tear the workers down after 30 s, is left out."""

    SIGNALS = (PREEMPTION_SIGNAL, signal.SIGTERM)
    ELASTIC = "TORCHELASTIC_SIGNALS_TO_HANDLE"
    ELASTIC_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # what torch elastic may still handle itself

    def __init__(self, training: bool = True):
        self.training = training  # other jobs (a server) just stop on the signal
        self.signals: set[int] = set()
        self._previous = {}
        self._elastic = None

    def _record(self, signum, frame) -> None:
        if not self.signals:
            print(f"[llmtrain] {signal.Signals(signum).name}: " + (
                "preemption notice; the workers save and stop, then the job asks to be requeued"
                if self.training else "passed on to the workers"), flush=True)
        self.signals.add(signum)
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    def __enter__(self) -> PreemptionNotice:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._record) for sig in self.SIGNALS}
            self._elastic = os.environ.get(self.ELASTIC)
            os.environ[self.ELASTIC] = self.ELASTIC_SIGNALS
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous:
            if self._elastic is None:
                os.environ.pop(self.ELASTIC, None)
            else:
                os.environ[self.ELASTIC] = self._elastic


def killed(rank: int, signum: int, world_size: int) -> str:
    """What a worker killed by a signal means, and what to do."""
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    cause = (" - most often the kernel's out-of-memory killer (`dmesg` or `journalctl -k` "
             "names it): the run needs more memory than this machine has. Compare the plan's "
             "memory line with the machine, then use fewer processes, a smaller micro batch or "
             "sequence, or more model parallelism") if signum == signal.SIGKILL else ""
    return (f"worker rank {rank} of {world_size} was killed by {name}{cause}. This was no "
            f"preemption: nothing was saved for it, and the run is not requeued; once the cause "
            f"is fixed, the same command resumes from the latest checkpoint")


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
    from llmtrain.runtime import stop_resource_tracker

    try:
        return _launch(cfg, layout, node_rank, spawn, entry)
    finally:
        stop_resource_tracker()


def _launch(cfg: Config, layout: Layout, node_rank: int, spawn: bool,
            entry: Optional[Callable]) -> dict:
    os.environ.update(cfg.launcher.env)
    port = cfg.launcher.master_port or free_port()
    if layout.world_size == 1 and not spawn:
        os.environ.update(MASTER_ADDR=cfg.launcher.master_addr, MASTER_PORT=str(port),
                          RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        return worker(cfg, layout, entry)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Each process's CPU threads get their share of the cores (torchrun sets 1): N processes
    # that each spin up a thread per core make small CPU steps 20-30x slower (OpenMP waits).
    if "OMP_NUM_THREADS" not in os.environ:
        cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                 else os.cpu_count() or 1)
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // layout.nproc_per_node))

    from torch.distributed import DistNetworkError

    def config(port: int) -> LaunchConfig:
        return LaunchConfig(
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
            # Newer torch sets the environment variable from this; older torch reads it.
            **({"signals_to_handle": PreemptionNotice.ELASTIC_SIGNALS}
               if "signals_to_handle" in LaunchConfig.__dataclass_fields__ else {}),
        )

    # A port we picked ourselves may be taken by another program before the store binds it:
    # then pick again (a port the user gave, or another node's, is kept and the error shown).
    retries = 2 if not cfg.launcher.master_port and layout.nnodes == 1 else 0
    with PreemptionNotice(training=entry is None) as notice:
        try:
            for attempt in range(retries + 1):
                try:
                    results = elastic_launch(config(port), worker)(cfg, layout, entry)
                    break
                except DistNetworkError as error:
                    if "EADDRINUSE" not in str(error) or attempt == retries:
                        raise
                    port = free_port()
        except ChildFailedError as error:
            codes = {failure.exitcode for failure in error.failures.values()}
            rank, failure = error.get_first_failure()
            if failure.exitcode < 0 and not notice.signals:
                # Killed from outside, no notice given: nothing was saved for a requeue.
                print(f"llmtrain: {killed(rank, -failure.exitcode, layout.world_size)}",
                      file=sys.stderr, flush=True)
                raise SystemExit(1) from None
            if REQUEUE_EXIT_CODE in codes or (notice.signals and notice.training):
                print(f"[llmtrain] the workers stopped to be requeued (exit status "
                      f"{REQUEUE_EXIT_CODE}); running the same command again resumes from the "
                      f"latest checkpoint", flush=True)
                raise Requeue(frozenset(notice.signals)) from None
            if codes == {2}:  # a refused resume: every worker stopped before training
                raise SystemExit(2) from None
            raise RuntimeError(f"worker rank {rank} failed (exit code {failure.exitcode}); "
                               f"its error is printed above") from None
    return next((r for r in results.values() if r), {})
