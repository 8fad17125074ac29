"""The training loop each worker process runs: build, resume, step, evaluate, save."""

from __future__ import annotations

import json
import math
import sys
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.errors import REQUEUE_EXIT_CODE, RunStopped
from llmtrain.hf_save import HFExports
from llmtrain.megatron import checkpoint, parallel
from llmtrain.megatron.expert_load import ExpertLoad
from llmtrain.megatron.init import initialize as initialize_weights
from llmtrain.megatron.nonfinite import NonFiniteGuard
from llmtrain.megatron.optimizer import build_optimizer, build_scheduler, wrap_ddp
from llmtrain.megatron.step import eval_step, schedule_name
from llmtrain.megatron.tasks import task_for
from llmtrain.megatron.transforms import apply_transforms
from llmtrain.metrics import RunLog
from llmtrain.preemption import Watcher
from llmtrain.profiling import StepProfiler
from llmtrain.runtime import quiet_libraries, sync_device


def run_path(cfg: Config, path: Optional[str]) -> Optional[Path]:
    """Config paths are relative to the run's output folder."""
    if path is None:
        return None
    return Path(cfg.output_dir) / path


def finite_or_null(value):
    """JSON has no NaN or infinity (a skipped step's loss): such numbers are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def train(cfg: Config, layout: Layout) -> dict:
    """Train to `stage.train_iters`; return the summary the logging rank saw (else {})."""
    quiet_libraries()
    parallel.initialize(layout, cfg.seed)
    try:
        return _train(cfg, layout)
    except RunStopped as stopped:  # raised by every rank together: say why once, exit with status
        if parallel.rank() == 0:
            print(f"llmtrain: {stopped}", file=sys.stderr, flush=True)
        parallel.barrier()  # no rank exits (and gets its peers killed) before rank 0 has said it
        raise SystemExit(stopped.exit_code) from None
    finally:
        parallel.shutdown()


def _train(cfg: Config, layout: Layout) -> dict:
    # From here on SIGTERM/SIGUSR1 only set a flag: the run stops at a step boundary and saves.
    watcher = Watcher(cfg.checkpoint.exit_signal_handler, layout.device)
    stage = cfg.stage
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model "
                         f"{cfg.model.name} has vocab_size {cfg.model.vocab_size}: use a model "
                         f"whose vocabulary holds the tokenizer's")
    log = RunLog(cfg, layout, parallel.is_logging_rank(),
                 run_path(cfg, cfg.logging.tensorboard_dir) if cfg.logging.tensorboard else None)

    # The stage's task (llmtrain.tasks) brings its model, batches and step.
    task = task_for(cfg, layout, tokenizer, log.message)
    chunks = task.build_model()
    initialize_weights(chunks, cfg.seed)
    apply_transforms(cfg, chunks, log.message)  # LoRA adapters on a frozen base (peft=lora)
    expert_load = ExpertLoad(chunks, cfg.model.num_layers, cfg.model.num_moe_experts,
                             layout.device) if cfg.model.num_moe_experts else None
    model = wrap_ddp(cfg, chunks)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)

    save_dir = run_path(cfg, cfg.checkpoint.save)
    # checkpoint.save_hf's exports (a PEFT adapter folder for a peft=lora run)
    hf_exports = HFExports(save_dir, log.message, adapters=cfg.peft.name != "none")
    checkpoints = checkpoint.Checkpoints(cfg, layout, tokenizer, save_dir, log.message)
    restored = checkpoints.restore(model, optimizer, scheduler)
    start = restored.iteration

    task.setup(model, start, save_dir)
    train_iters, valid_iters = task.batches(start), task.validation_batches(start)
    schedule_args = dict(num_microbatches=layout.num_microbatches, seq_length=cfg.data.seq_length,
                         micro_batch_size=stage.micro_batch_size, device=layout.device)

    threads = f" of {torch.get_num_threads()} thread(s)" if layout.device == "cpu" else ""
    log.message(f"training {cfg.model.name} for {stage.train_iters} steps on "
                f"{layout.world_size} {layout.device} process(es){threads}, pipeline schedule "
                f"{schedule_name()}; output in {cfg.output_dir}")
    losses: list[float] = []
    lrs: list[float] = []
    step_seconds: list[float] = []
    metrics: dict[str, list[float]] = {}
    last_saved = start
    guard = NonFiniteGuard(cfg, model, layout.device, log.message)
    profiler = StepProfiler(cfg.logging.profile_step_start, cfg.logging.profile_step_end,
                            cfg.logging.profile_ranks if cfg.logging.profile else [],
                            parallel.rank(), run_path(cfg, "profile"),
                            lambda text: print(f"[llmtrain] {text}", flush=True))
    preempted, exiting = None, False
    restored.restore_rng()  # after the data loaders drew their seeds: the streams go on exactly
    for iteration in range(start + 1, stage.train_iters + 1):
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        profiler.before(iteration)
        began = time.perf_counter()
        result = task.step(iteration, model, optimizer, scheduler, train_iters,
                           partial(guard, iteration))
        sync_device(layout.device)
        seconds = time.perf_counter() - began
        step_seconds.append(seconds)
        lrs.append(lr)
        if result.loss is not None:
            losses.append(result.loss)
        scale = optimizer.get_loss_scale().item() if cfg.precision.fp16 else None
        step_metrics = dict(result.metrics)
        if expert_load is not None:
            imbalance, dropped = expert_load.take()
            step_metrics.update(moe_load_imbalance=sum(imbalance.values()) / len(imbalance),
                                moe_load_imbalance_max=max(imbalance.values()))
            if cfg.model.moe_expert_capacity_factor is not None:
                step_metrics["moe_dropped_fraction"] = dropped
            log.expert_load(iteration, imbalance)
        for key, value in step_metrics.items():
            metrics.setdefault(key, []).append(value)
        log.step(iteration, result.loss, lr, result.grad_norm,
                 seconds, scale, result.skipped, step_metrics)
        profiler.after(iteration)
        if stage.eval_interval and valid_iters[0] is not None and (
                iteration % stage.eval_interval == 0 or iteration == stage.train_iters):
            total = 0.0
            for _ in range(stage.eval_iters):
                total += eval_step(model, valid_iters, **schedule_args).loss or 0.0
            log.evaluation(iteration, total / stage.eval_iters)
        # The other trained roles' commits (PPO's critic) come before the trained model's of
        # the same step, which resuming starts from.
        task.poll()
        if not task.saving():
            checkpoints.poll()
        signal_name = watcher.agreed_signal() if iteration < stage.train_iters else None
        exiting = bool(stage.exit_interval and iteration % stage.exit_interval == 0
                       and iteration < stage.train_iters)
        if save_dir and (signal_name or exiting or cfg.checkpoint.save_interval and (
                iteration % cfg.checkpoint.save_interval == 0)):
            # The other trained roles (PPO's critic) first: the trained model's commit, which
            # resuming starts from, comes last.
            task.save(iteration, blocking=bool(signal_name or exiting))
            hf_now = bool(cfg.checkpoint.save_hf and cfg.checkpoint.save_hf_interval
                          and iteration % cfg.checkpoint.save_hf_interval == 0
                          and iteration < stage.train_iters)
            checkpoints.save(iteration, model, optimizer, scheduler,
                             blocking=bool(signal_name or exiting or hf_now))
            last_saved = iteration
            if hf_now:  # the export reads the committed step while training goes on
                hf_exports.start(iteration)
        if signal_name:
            preempted = (iteration, signal_name)
            break
        if exiting:
            log.message(f"stopped after step {iteration} (stage.exit_interval="
                        f"{stage.exit_interval}); the same command resumes")
            break
    watcher.close()
    if (save_dir and cfg.checkpoint.save_on_exit and last_saved < stage.train_iters
            and not preempted and not exiting):
        task.save(stage.train_iters, blocking=False)
        checkpoints.save(stage.train_iters, model, optimizer, scheduler)
    task.wait()
    checkpoints.wait()
    if (save_dir and cfg.checkpoint.save_hf and not preempted and not exiting
            and (last_saved == stage.train_iters or cfg.checkpoint.save_on_exit)):
        hf_exports.finish(stage.train_iters)  # the last step
    else:
        hf_exports.wait()

    summary = {}
    summary_path = Path(cfg.output_dir) / "summary.json"
    if log.enabled:
        summary = {"final_loss": losses[-1] if losses else None, "first_loss":
                   losses[0] if losses else None, "steps": stage.train_iters,
                   "start_step": start, "losses": losses, "lrs": lrs, "step_seconds": step_seconds,
                   "tokens_per_step": log.tokens_per_step, "world_size": layout.world_size,
                   "flops_per_token": log.flops_per_token, "peak_tflops": log.peak, **log.last,
                   "metrics": metrics,
                   "preempted_after_step": preempted[0] if preempted else None}
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        summary_path.write_text(json.dumps(finite_or_null(summary), indent=1, allow_nan=False))
    log.close(summary_path)
    if preempted:
        saved = f"saved step {preempted[0]}" if save_dir else "nothing saved (checkpoint.save=null)"
        raise RunStopped(f"{preempted[1]} received: stopped after step {preempted[0]}, {saved}; "
                         f"exit status {REQUEUE_EXIT_CODE} asks for a requeue, and the same "
                         f"command resumes", exit_code=REQUEUE_EXIT_CODE)
    return summary
