"""Worker processes on this machine, started the way torchrun does (torch.distributed elastic).

A one-process run trains in the calling process: no spawn, no second Python start-up.
"""

from __future__ import annotations

import os
import socket
import traceback
import uuid

from llmtrain.config.schema import Config
from llmtrain.config.validate import Layout
from llmtrain.launch import REQUEUE_EXIT_CODE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def worker(cfg: Config, layout: Layout) -> dict:
    """Entry point of each worker; a failure is printed with its rank before it propagates."""
    from llmtrain.train import train

    try:
        return train(cfg, layout)
    except Exception:
        print(f"[rank {os.environ.get('RANK', '0')}] "
              + traceback.format_exc(), flush=True)
        raise


def launch(cfg: Config, layout: Layout, node_rank: int = 0) -> dict:
    """Run the job's workers on this node; return the summary of the rank that logged."""
    os.environ.update(cfg.launcher.env)
    port = cfg.launcher.master_port or free_port()
    if layout.world_size == 1:
        os.environ.update(MASTER_ADDR=cfg.launcher.master_addr, MASTER_PORT=str(port),
                          RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        return worker(cfg, layout)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from llmtrain.preemption import forward_to_workers

    config = LaunchConfig(
        min_nodes=layout.nnodes,
        max_nodes=layout.nnodes,
        nproc_per_node=layout.nproc_per_node,
        run_id=os.environ.get("LLMTRAIN_RUN_ID", uuid.uuid4().hex[:8]),
        rdzv_backend="static",
        rdzv_endpoint=f"{cfg.launcher.master_addr}:{port}",
        rdzv_configs={"rank": node_rank},
        max_restarts=0,
        monitor_interval=0.2,
        start_method="spawn",
    )
    try:
        with forward_to_workers():  # SIGTERM/SIGUSR1: the workers save, then exit with 3
            results = elastic_launch(config, worker)(cfg, layout)
    except ChildFailedError as error:
        # Workers that stopped on purpose exit with a status and said why (llmtrain.train).
        codes = {failure.exitcode for failure in error.failures.values()}
        if REQUEUE_EXIT_CODE in codes or codes == {2}:
            raise SystemExit(REQUEUE_EXIT_CODE if REQUEUE_EXIT_CODE in codes else 2) from None
        rank, failure = error.get_first_failure()
        raise RuntimeError(f"worker rank {rank} failed (exit code {failure.exitcode}); "
                           f"its error is printed above") from None
    return next((r for r in results.values() if r), {})
