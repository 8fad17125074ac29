"""Worker processes for the data tools, and the progress line they print.

`ordered_map` runs a function over a stream of chunks on worker processes, each set up once
(a tokenizer is loaded once per worker), and yields the results in input order, so that output
is identical whatever the number of workers. At most two chunks per worker are in flight, so
inputs larger than memory stream through. On Linux workers are forked (they start at once, with
the modules already imported; the parent has started no tokenizer threads by then), elsewhere
spawned.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import deque
from typing import Callable, Iterable, Iterator, Optional, TextIO


def default_workers() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def ordered_map(function: Callable, items: Iterable, workers: int,
                initializer: Optional[Callable] = None, initargs: tuple = ()) -> Iterator:
    """`function(item)` for every item, in order, on `workers` processes (in this one for 1)."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield function(item)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(workers, initializer, initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(function, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} "


class Progress:
    """A progress line with documents/s and `unit`s/s (tokens, or B: bytes): redrawn in place
    on a terminal, printed every `interval` seconds otherwise (logs)."""

    def __init__(self, what: str, stream: Optional[TextIO] = None,
                 interval: Optional[float] = None, enabled: bool = True, unit: str = "tokens"):
        self.what = what
        self.unit = unit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 30.0)
        self.enabled = enabled
        self.started = time.perf_counter()
        self.shown = self.started
        self.docs = self.tokens = 0

    @property
    def seconds(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def rates(self) -> str:
        s = self.seconds
        total = f"{_si(self.tokens)}B" if self.unit == "B" else f"{self.tokens:,} {self.unit}"
        return (f"{self.docs:,} docs, {total} in {s:.1f} s: "
                f"{_si(self.docs / s)}docs/s, {_si(self.tokens / s)}{self.unit}/s")

    def update(self, docs: int, tokens: int = 0) -> None:
        """`docs` more documents and `tokens` more of the unit (tokens or bytes)."""
        self.docs += docs
        self.tokens += tokens
        now = time.perf_counter()
        if self.enabled and now - self.shown >= self.interval:
            self.shown = now
            end = "\r" if self.tty else "\n"
            self.stream.write(f"{self.what}: {self.rates()}   {end}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
