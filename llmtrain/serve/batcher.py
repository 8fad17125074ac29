"""The server's one worker loop: it takes requests from every client off a queue, runs them
together in batches on the engine, and hands each token and result back to the request's HTTP
handler as soon as it exists.

The loop runs on the driver's main thread (where the model runs; the HTTP server has its own
thread and event loop). A batch is static: it starts with what is queued (waiting `wait_s` for
more to join once the first request is in) and runs until its last sequence finishes; sequences
that finish earlier are answered at once. Requests arriving meanwhile form the next batch.
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

    def feed(self, token: int, text: Text) -> tuple[str, bool]:
        """The text that can be handed out after `token`, and whether a stop string ended the
        sequence. Text that may be the start of a stop string is held back, and so is a token
        that ends inside a multi-byte character."""
        self.tokens.append(token)
        full = text.decode(self.tokens)
        if full.endswith("\ufffd"):
            return "", False
        hits = [full.find(s) for s in self.stops if s in full]
        if hits:
            self.final_text = full[:min(hits)]
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
    """What the server has done, for /metrics and the log."""

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


class Batcher:
    """Queue in, batches through the engine, events out: generation (`_run`), or a reward
    model's scores (ScoreBatcher)."""

    def __init__(self, engine, text: Text, wait_s: float):
        self.engine = engine
        self.text = text
        self.wait_s = wait_s
        self.pending: "queue.Queue[Work]" = queue.Queue()
        self.leftover: deque = deque()  # (work, choice) of requests bigger than a batch
        self.metrics = Metrics()
        self.stopping = threading.Event()

    def submit(self, work: Work) -> None:
        """From the HTTP thread: queue a request."""
        self.metrics.requests += 1
        self.pending.put(work)

    def run(self) -> None:
        """The loop (driver's main thread) until `stopping` is set."""
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
            tokens, made = self._process(batch)
        except Exception as error:
            for work, _ in batch:
                work.post("error", f"{type(error).__name__}: {error}")
            print(f"[serve] batch failed: {type(error).__name__}: {error}", file=sys.stderr,
                  flush=True)
            return
        seconds = time.perf_counter() - began
        m = self.metrics
        m.batches += 1
        m.sequences += len(batch)
        m.batch_sizes[len(batch)] += 1
        m.busy_seconds += seconds
        m.prompt_tokens += tokens
        m.generated_tokens += made
        requests = len({id(w) for w, _ in batch})
        print(f"[serve] batch {m.batches}: {len(batch)} sequence(s) from {requests} "
              f"request(s), {tokens} prompt and {made} generated tokens in {seconds:.2f} s",
              file=sys.stderr, flush=True)

    def _process(self, batch: list) -> tuple[int, int]:
        """Generate the batch, answering each sequence as it finishes; (prompt tokens, tokens
        made)."""
        text = self.text

        def on_token(row: int, token: int, logprob, top) -> bool:
            work, choice = batch[row]
            if work.cancelled:
                return True
            delta, stopped = choice.feed(token, text) if choice.watch else ("", False)
            if work.stream:
                work.post("token", choice.index, token, logprob, top, delta)
            return stopped

        def on_finish(row: int, output: Output) -> None:
            work, choice = batch[row]
            rest = choice.finish(output, text)
            work.post("done", choice.index, output, rest if work.stream else choice.final_text)

        outputs = self.engine.generate([c.sequence for _, c in batch], on_token, on_finish)
        return (sum(len(c.sequence.prompt) for _, c in batch),
                sum(len(o.tokens) for o in outputs))


@dataclass
class Scored:
    """One sequence of a reward request."""

    ids: list[int]
    index: int


class ScoreBatcher(Batcher):
    """Batches of a reward model's sequences (each request's choices are Scored); events
    ("done", index, score, None), or ("error", message)."""

    def _process(self, batch: list) -> tuple[int, int]:
        scores = self.engine.score([c.ids for _, c in batch])
        for (work, choice), score in zip(batch, scores):
            work.post("done", choice.index, score, None)
        return sum(len(c.ids) for _, c in batch), 0
