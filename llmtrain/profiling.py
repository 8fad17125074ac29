"""Profiles a window of training steps with torch.profiler (Megatron-LM's --profile with
--use-pytorch-profiler): a Chrome trace per profiled rank, and a summary in the log that says
where the GPU's time went (matrix products, attention, norms, ...) and how long it sat idle.

    python -m llmtrain ... logging.profile=true logging.profile_step_start=10 logging.profile_step_end=12

Open the trace (profile/rank<R>_steps<S>-<E>.json.gz in the run's folder) in Perfetto
(ui.perfetto.dev) or chrome://tracing.
"""

from __future__ import annotations

import gzip
import json
import re
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch

# Kernel families by name, first match wins; what matches none is "elementwise and other".
KERNEL_KINDS = (
    ("communication", re.compile(r"nccl", re.I)),
    ("attention", re.compile(r"flash|fmha|attn|attention|cudnn", re.I)),
    ("matrix products", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|wgrad", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|l2norm", re.I)),
    ("norms", re.compile(r"norm", re.I)),
    ("cross entropy", re.compile(r"cross_entropy|softmax|logsumexp", re.I)),
    ("fp8 casts", re.compile(r"cast_transpose|quantize|amax|fp8|float8", re.I)),
)
MEMORY = {"gpu_memcpy": "memory copies", "gpu_memset": "memory copies"}


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)),
                "elementwise and other")


def gpu_summary(events: list[dict], steps: int) -> Optional[str]:
    """Where the GPU's time went in a Chrome trace's events (None: no GPU activity).
    Busy time is the union of kernel and copy intervals; idle is the rest of the window from
    the first to the last of them."""
    spans, by_kind, by_kernel = [], {}, {}
    for event in events:
        category = event.get("cat")
        if category != "kernel" and category not in MEMORY:
            continue
        start, duration = float(event["ts"]), float(event.get("dur", 0.0))
        spans.append((start, start + duration))
        kind = MEMORY.get(category) or kind_of(event.get("name", ""))
        by_kind[kind] = by_kind.get(kind, 0.0) + duration
        name = event.get("name", "?")
        by_kernel[name] = by_kernel.get(name, 0.0) + duration
    if not spans:
        return None
    spans.sort()
    busy, end = 0.0, spans[0][0]
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    window = spans[-1][1] - spans[0][0]
    total = sum(by_kind.values())
    lines = [f"GPU over {steps} step(s): {window / 1e3 / steps:.1f} ms per step, busy "
             f"{100 * busy / window:.1f}%, idle {(window - busy) / 1e3 / steps:.1f} ms per step"]
    for kind, micros in sorted(by_kind.items(), key=lambda item: -item[1]):
        lines.append(f"  {kind:<24}{micros / 1e3 / steps:>10.1f} ms/step {100 * micros / total:>6.1f}%")
    lines.append("  top kernels:")
    for name, micros in sorted(by_kernel.items(), key=lambda item: -item[1])[:30]:
        lines.append(f"  {micros / 1e3 / steps:>10.1f} ms/step  {name[:110]}")
    return "\n".join(lines)


class StepProfiler:
    """`before(iteration)` and `after(iteration)` around each step; records steps
    start..end (inclusive) on the chosen ranks, then writes the trace and says the summary."""

    def __init__(self, start: int, end: int, ranks: list[int], rank: int, folder: Path,
                 say: Callable[[str], None]):
        self.start, self.end, self.folder, self.say = start, end, folder, say
        self.enabled = rank in ranks
        self.rank = rank
        self.profiler: Optional[torch.profiler.profile] = None

    def before(self, iteration: int) -> None:
        if not self.enabled or iteration != self.start:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.profiler.start()

    def after(self, iteration: int) -> None:
        if self.profiler is None or iteration != self.end:
            return
        self.profiler.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"rank{self.rank}_steps{self.start}-{self.end}.json.gz"
        self.profiler.export_chrome_trace(str(trace))  # gzipped by its name
        with gzip.open(trace, "rt") as packed:
            events = json.load(packed).get("traceEvents", [])
        steps = self.end - self.start + 1
        summary = gpu_summary(events, steps)
        if summary is None:  # a CPU run: the operators that took the time
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Profiler clears events.*")
                summary = self.profiler.key_averages().table(sort_by="self_cpu_time_total",
                                                             row_limit=15)
        if torch.cuda.is_available():  # retries mean a full cache: frees and syncs mid-step
            retries = torch.cuda.memory_stats().get("num_alloc_retries", 0)
            summary += (f"\n  allocator retries so far: {retries}"
                        f"{' (try PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)' if retries else ''}")
        (self.folder / f"rank{self.rank}_summary.txt").write_text(summary + "\n")
        self.say(f"profile of steps {self.start}-{self.end} on rank {self.rank} "
                 f"(trace: {trace})\n{summary}")
        self.profiler = None
