"""What a run reports each step: console lines, TensorBoard scalars and the experiment trackers
(Weights & Biases, MLflow), from one rank."""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Optional

import torch

from llmtrain.config.layout import Layout
from llmtrain.config.plan import flops_per_token, peak_tflops
from llmtrain.config.schema import Config
from llmtrain.tracking import Trackers

GIB = 1024**3


def peak_memory_gib(device: str) -> float:
    """Peak GPU memory allocated by this process, or peak resident memory on CPU."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class RunLog:
    """Formats and writes the metrics of the logging rank; other ranks pass `enabled=False`."""

    def __init__(self, cfg: Config, layout: Layout, enabled: bool, tensorboard_dir: Optional[Path]):
        self.enabled = enabled
        self.cfg = cfg
        self.layout = layout
        self.tokens_per_step = cfg.stage.global_batch_size * cfg.data.seq_length
        self.flops_per_token = flops_per_token(cfg.model, layout.padded_vocab_size,
                                               cfg.data.seq_length)
        name = torch.cuda.get_device_name() if layout.device == "cuda" else "cpu"
        self.peak = peak_tflops(name) if layout.device == "cuda" else None
        self.writer = None
        if enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))
        self.trackers = Trackers(cfg, self.message) if enabled else None
        self.started = time.monotonic()
        self.last: dict[str, float] = {}

    def step(self, iteration: int, loss: Optional[float], lr: float, grad_norm: Optional[float],
             seconds: float, loss_scale: Optional[float] = None, skipped: bool = False,
             metrics: Optional[dict[str, float]] = None) -> None:
        """`metrics`: the stage's own measures (reward, KL, accuracy, ...), as train/<name>."""
        if not self.enabled:
            return
        tokens_per_s = self.tokens_per_step / seconds
        tflops = self.flops_per_token * tokens_per_s / self.layout.world_size / 1e12
        scalars = {
            "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
            "throughput/tokens_per_s": tokens_per_s,
            "throughput/tokens_per_s_per_gpu": tokens_per_s / self.layout.world_size,
            "throughput/tflops_per_gpu": tflops,
            "throughput/mfu": tflops / self.peak if self.peak else None,
            "throughput/step_seconds": seconds,
            "memory/peak_gib": peak_memory_gib(self.layout.device),
            "train/loss_scale": loss_scale,
            **{f"train/{key}": value for key, value in (metrics or {}).items()},
        }
        self.last = {k: v for k, v in scalars.items() if v is not None}
        self._write(self.last, iteration)
        if iteration % self.cfg.logging.log_interval and iteration != self.cfg.stage.train_iters:
            return
        remaining = (self.cfg.stage.train_iters - iteration) * seconds
        mfu = f" | MFU {100 * tflops / self.peak:.1f}%" if self.peak else ""
        grad = f" | grad norm {grad_norm:.3f}" if grad_norm is not None else ""
        scale = f" | loss scale {loss_scale:.0f}" if loss_scale is not None else ""
        scale += "".join(f" | {key} {value:.4f}" for key, value in (metrics or {}).items())
        print(f"step {iteration:>6}/{self.cfg.stage.train_iters} | loss {loss:.4f} | "
              f"lr {lr:.3e}{grad}{scale} | {tokens_per_s:,.0f} tok/s | "
              f"{tflops:.1f} TFLOP/s/{'GPU' if self.layout.device == 'cuda' else 'proc'}{mfu}"
              f" | mem {scalars['memory/peak_gib']:.2f} GiB | {seconds:.3f} s/step | "
              f"eta {_duration(remaining)}{' | skipped' if skipped else ''}", flush=True)

    def expert_load(self, iteration: int, imbalance: dict[int, float]) -> None:
        """Each MoE layer's busiest expert over its mean load this step ({layer: ratio}):
        TensorBoard's moe/layer_NN_load_imbalance, and a line at each log interval."""
        if not self.enabled:
            return
        self._write({f"moe/layer_{i:02d}_load_imbalance": value
                     for i, value in imbalance.items()}, iteration)
        layers = list(imbalance)
        span = (f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1))
                else ",".join(map(str, layers)))
        if iteration % self.cfg.logging.log_interval == 0 or \
                iteration == self.cfg.stage.train_iters:
            print(f"step {iteration:>6} | expert load imbalance (busiest / mean) of layers "
                  f"{span}: {' '.join(f'{v:.2f}' for v in imbalance.values())}", flush=True)

    def evaluation(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(loss, 50.0))
        self._write({"valid/loss": loss, "valid/ppl": ppl}, iteration)
        print(f"step {iteration:>6} | validation loss {loss:.4f} | perplexity {ppl:.2f}",
              flush=True)

    def _write(self, scalars: dict[str, float], iteration: int) -> None:
        if self.writer:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, iteration)
        if self.trackers:
            self.trackers.log(scalars, iteration)

    def message(self, text: str) -> None:
        if self.enabled:
            print(f"[llmtrain] {text}", flush=True)

    def close(self, summary: Optional[Path] = None) -> None:
        """`summary`: the run's summary.json, which MLflow keeps as an artifact."""
        if self.writer:
            self.writer.close()
        if self.trackers:
            self.trackers.finish(summary)
