"""The server's one worker loop: it takes requests from every client off a queue, runs them
together in batches on the engine, and hands each token and result back to the request's HTTP
handler as soon as it exists.

The loop runs on the driver's main thread (where the model runs; the HTTP server has its own
thread and event loop). Generation is batched by the engine itself: each request's sequences
are added as they arrive and each is answered as soon as it finishes. A reward model's scores
are static batches (ScoreBatcher).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Optional

from llmtrain.generate.sequence import Output, Sequence
from llmtrain.generate.text import Text


@dataclass
class Choice:
    """One sequence of a request, and the text it has produced so far. `watch` (streaming, stop
    strings) decodes the text token by token."""

    sequence: Sequence
    index: int  # the choice's index in the response
    stops: tuple[str, ...] = ()
    watch: bool = False
    tokens: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the generated text handed out
    final_text: Optional[str] = None
    stop_reason: Optional[str] = None  # the stop string that ended it (vLLM's stop_reason)

    def feed(self, token: int, text: Text) -> tuple[str, bool]:
        """The text that can be handed out after `token`, and whether a stop string ended the
        sequence. Text that may be the start of a stop string is held back, and so is a token
        that ends inside a multi-byte character."""
        self.tokens.append(token)
        full = text.decode(self.tokens)
        if full.endswith("\ufffd"):
            return "", False
        hits = sorted((full.find(s), s) for s in self.stops if s in full)
        if hits:
            at, self.stop_reason = hits[0]
            self.final_text = full[:at]
            return self._emit(self.final_text), True
        hold = max((n for s in self.stops for n in range(len(s) - 1, 0, -1)
                    if full.endswith(s[:n])), default=0)
        return self._emit(full[:len(full) - hold]), False

    def finish(self, output: Output, text: Text) -> str:
        """The rest of the text once the sequence has finished."""
        if self.final_text is None:
            self.final_text = text.decode(output.visible(self.sequence.stop_ids))
        return self._emit(self.final_text)

    def _emit(self, upto: str) -> str:
        new = upto[self.emitted:]
        self.emitted = max(self.emitted, len(upto))
        return new


@dataclass
class Work:
    """One request: its sequences and the way back to its handler (an asyncio queue on the HTTP
    thread's loop). Events: ("token", choice, token, logprob, top, new text),
    ("done", choice, Output, text: the rest when streaming, else all of it), ("error", message)."""

    choices: list[Choice]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    stream: bool = False
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)

    def post(self, *event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the HTTP loop is gone (shutting down): nobody is listening
            self.cancelled = True


class Metrics:
    """What the server has done, for /metrics and the log. `batches` counts the engine's
    rounds (`advance` calls: a whole static batch, or a few decode steps of a continuous one)
    and `batch_sizes` the sequences in flight during each."""

    def __init__(self):
        self.requests = 0
        self.batches = 0
        self.sequences = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.batch_sizes: Counter = Counter()
        self.busy_seconds = 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "batches": self.batches, "sequences": self.sequences,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens,
                "max_batch_size": max(self.batch_sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "busy_seconds": round(self.busy_seconds, 3)}


class _Loop:
    """Requests queued by the HTTP thread for the loop on the driver's main thread."""

    def __init__(self, engine, text: Text, wait_s: float):
        self.engine = engine
        self.text = text
        self.wait_s = wait_s
        self.pending: "queue.Queue[Work]" = queue.Queue()
        self.metrics = Metrics()
        self.stopping = threading.Event()

    def submit(self, work: Work) -> None:
        """From the HTTP thread: queue a request."""
        self.metrics.requests += 1
        self.pending.put(work)


class Batcher(_Loop):
    """Queue in, sequences through the engine, events out. Requests join the engine as they
    arrive (`engine.add`), and the loop advances it while it has work: with the decode engine a
    request that arrives while others generate joins them within a few steps; Megatron-Core's
    engine runs what waits as its next static batch."""

    def __init__(self, engine, text: Text, wait_s: float):
        super().__init__(engine, text, wait_s)
        self.in_flight: dict = {}  # id(choice) -> work, of sequences in the engine

    def run(self) -> None:
        """The loop (driver's main thread) until `stopping` is set."""
        while not self.stopping.is_set():
            self._take()
            if self.in_flight:
                self._advance()

    def _take(self) -> None:
        """Hand queued requests to the engine. An idle engine waits for the first one, then
        `wait_s` for more to start with it."""
        works, block_s, deadline = [], 0.0 if self.in_flight else 0.1, None
        while True:
            try:
                work = self.pending.get(timeout=block_s) if block_s > 0 \
                    else self.pending.get_nowait()
            except queue.Empty:
                if deadline is None or time.perf_counter() >= deadline:
                    break
                block_s = min(deadline - time.perf_counter(), 0.005)
                continue
            if not work.cancelled:
                works.append(work)
            if deadline is None and not self.in_flight:
                deadline = time.perf_counter() + self.wait_s
            block_s = 0.0
        sequences = 0
        for work in works:
            sequences += self._add(work)
        if works:
            print(f"[serve] {sequences} sequence(s) from {len(works)} request(s) join "
                  f"{len(self.in_flight) - sequences} in flight", file=sys.stderr, flush=True)

    def _add(self, work: Work) -> int:
        """The request's sequences into the engine; how many."""
        text = self.text
        for choice in work.choices:
            def on_token(token: int, logprob, top, choice=choice) -> bool:
                if work.cancelled:
                    return True
                delta, stopped = choice.feed(token, text) if choice.watch else ("", False)
                if work.stream:
                    work.post("token", choice.index, token, logprob, top, delta)
                return stopped

            def on_finish(output: Output, choice=choice) -> None:
                del self.in_flight[id(choice)]
                self.metrics.generated_tokens += len(output.tokens)
                rest = choice.finish(output, text)
                work.post("done", choice.index, output,
                          rest if work.stream else choice.final_text)

            try:
                self.engine.add(choice.sequence, on_token, on_finish)
            except ValueError as error:  # the HTTP side checks first: this is a last guard
                work.cancelled = True
                work.post("error", str(error))
                return 0
            self.in_flight[id(choice)] = work
            self.metrics.sequences += 1
            self.metrics.prompt_tokens += len(choice.sequence.prompt)
        return len(work.choices)

    def _advance(self) -> None:
        """One round of the engine; a failure fails the requests in flight, not the server."""
        began = time.perf_counter()
        running = len(self.in_flight)
        try:
            self.engine.advance()
        except Exception as error:
            for work in {id(w): w for w in self.in_flight.values()}.values():
                work.post("error", f"{type(error).__name__}: {error}")
            self.in_flight.clear()
            self.engine.abort()
            print(f"[serve] generation failed: {type(error).__name__}: {error}",
                  file=sys.stderr, flush=True)
            return
        m = self.metrics
        m.batches += 1
        m.batch_sizes[running] += 1
        m.busy_seconds += time.perf_counter() - began


@dataclass
class Scored:
    """One sequence of a reward request."""

    ids: list[int]
    index: int


class ScoreBatcher(_Loop):
    """Static batches of a reward model's sequences (each request's choices are Scored):
    what is queued when one starts (waiting `wait_s` for more once the first is in); events
    ("done", index, score, None), or ("error", message)."""

    def __init__(self, engine, text: Text, wait_s: float):
        super().__init__(engine, text, wait_s)
        self.leftover: deque = deque()  # (work, choice) of requests bigger than a batch

    def run(self) -> None:
        while not self.stopping.is_set():
            batch = self._next_batch()
            if batch:
                self._run(batch)

    def _take(self, batch: list, block_s: float) -> bool:
        """Move queued sequences into `batch` (up to the engine's batch size); whether any."""
        size = self.engine.max_batch_size
        moved = False
        while len(batch) < size and self.leftover:
            batch.append(self.leftover.popleft())
            moved = True
        while len(batch) < size:
            try:
                work = self.pending.get(timeout=block_s) if block_s > 0 \
                    else self.pending.get_nowait()
            except queue.Empty:
                break
            block_s = 0
            if work.cancelled:
                continue
            pairs = [(work, c) for c in work.choices]
            room = size - len(batch)
            batch.extend(pairs[:room])
            self.leftover.extend(pairs[room:])
            moved = True
        return moved

    def _next_batch(self) -> list:
        batch: list = []
        if not self._take(batch, block_s=0.1):
            return batch
        deadline = time.perf_counter() + self.wait_s
        while len(batch) < self.engine.max_batch_size:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._take(batch, block_s=min(left, 0.005))
        return [(w, c) for w, c in batch if not w.cancelled]

    def _run(self, batch: list) -> None:
        """One batch; a failure fails its requests, not the server."""
        began = time.perf_counter()
        try:
            scores = self.engine.score([c.ids for _, c in batch])
        except Exception as error:
            for work, _ in batch:
                work.post("error", f"{type(error).__name__}: {error}")
            print(f"[serve] batch failed: {type(error).__name__}: {error}", file=sys.stderr,
                  flush=True)
            return
        for (work, choice), score in zip(batch, scores):
            work.post("done", choice.index, score, None)
        m = self.metrics
        m.batches += 1
        m.sequences += len(batch)
        m.batch_sizes[len(batch)] += 1
        m.busy_seconds += time.perf_counter() - began
        m.prompt_tokens += sum(len(c.ids) for _, c in batch)
        print(f"[serve] batch {m.batches}: {len(batch)} sequence(s) from "
              f"{len({id(w) for w, _ in batch})} request(s) scored", file=sys.stderr, flush=True)
