"""What every process of an inference job does: join the process groups, load the checkpoint into
an engine (a Scorer for a reward model), and either drive it (one rank: `task(engine)`, whose
result the launcher returns) or follow it until the driver is done."""

from __future__ import annotations

import gc
import signal
import sys
import time
import warnings
from typing import Callable

from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config
from llmtrain.generate.plan import Plan
from llmtrain.runtime import quiet_libraries


def run(plan: Plan, task: Callable, cfg: Config, layout: Layout, driver_stops: bool = False
        ) -> dict:
    """Entry point of each worker (`launch(..., entry=partial(run, plan, task))`).
    `driver_stops`: SIGTERM is the driver's to act on (a server finishes its requests and stops
    its followers); the other ranks ignore it."""
    quiet_libraries()
    # torch's checkpoint reader warns about its own argument order and process groups.
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
    from llmtrain.megatron import parallel
    from llmtrain.megatron.inference import load_engine
    from llmtrain.megatron.scoring import Scorer

    parallel.initialize(layout, cfg.seed)
    try:
        began = time.perf_counter()
        sizes = (plan.max_batch_size, plan.max_sequence_length)
        engine = Scorer.load(cfg, layout, plan.root, plan.iteration, *sizes) \
            if plan.reward_model else load_engine(cfg, layout, plan.root, plan.iteration,
                                                  *sizes, plan.engine)
        # The model's objects live as long as the process: the garbage collector stops scanning
        # them, which it would otherwise do many times per generated token.
        gc.freeze()
        if not engine.is_driver:
            if driver_stops:  # the launcher passes SIGTERM on to every worker
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            engine.follow()
            return {}
        print(f"[llmtrain] loaded {plan.model.name} step {plan.iteration} from {plan.root} in "
              f"{time.perf_counter() - began:.1f} s on {layout.world_size} {layout.device} "
              f"process(es) (TP {layout.tensor_model_parallel_size} x PP "
              f"{layout.pipeline_model_parallel_size}, {cfg.precision.name})"
              + (f"; {engine.description}" if hasattr(engine, "description") else ""),
              file=sys.stderr, flush=True)
        try:
            return task(engine)
        finally:
            engine.stop_followers()
    finally:
        parallel.shutdown()
