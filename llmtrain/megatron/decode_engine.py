"""Generation with continuous batching and CUDA-graph decode, on a model that one rank holds or
that its tensor-parallel ranks share.

The engine owns `max_batch_size` rows of a KV cache (llmtrain.megatron.kv_model). A sequence
that is `add`ed waits until `advance` finds it a free row: its prompt but the last token is
prefilled into the row, and from then on each decode step feeds every live row its last token at
its own position, samples the next one (llmtrain.generate.sampler) and records it, all on the
device. The host looks every `sync_every` steps: it hands new tokens to their callbacks, answers
finished sequences and frees their rows, which the next `advance` refills. So a sequence that
arrives while others generate joins them after at most `sync_every` steps.

Under tensor parallelism every rank of the replica runs the same engine in lockstep: the driver
(the one that talks to users) opens each `advance` by sending its followers what changed on the
host since the last (the sequences added, the rows its callbacks stopped, an abort), and from
there each rank's device state evolves identically, since every rank samples the same tokens
from the same gathered logits with the same keys.

On a GPU the layers' step is compiled (llmtrain.megatron.kv_model) and each (rows, attended span,
sampling mode) shape of the step is captured once in a CUDA graph and replayed: one launch per
token for the whole model. On a CPU the same step runs eagerly
(`graphs=False`), which is also the reference the graphs are checked against.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from llmtrain.generate.sampler import Mode, RowSampling, row_keys
from llmtrain.generate.sequence import (OnFinish, OnToken, Output, Sampling, Sequence,
                                        check_batch)
from llmtrain.megatron.replica import Replica
from llmtrain.megatron.kv_model import KVModel

# The decode step's shapes (a CUDA graph each): rows rounded up to a power of two, attended
# positions to a multiple of _SPAN (attention reads the whole span of every row).
_SPAN = 128
_STOP_WIDTH = 8  # stop ids per row (grows, in powers of two, for sequences with more)
_MAX_TOP = 20  # top log-probabilities kept per token (OpenAI's limit)
_PREFILL_TOKENS = 16384  # prompt tokens (rows x padded length) in one prefill


def _bucket(n: int, low: int, high: int) -> int:
    size = low
    while size < n:
        size *= 2
    return min(size, high)


@dataclass
class _Round:
    """What the driver tells its followers at the start of an `advance`."""

    added: list = field(default_factory=list)  # sequences, in the order they were added
    stopped: list = field(default_factory=list)  # rows the driver's callbacks ended
    abort: bool = False  # drop everything first


@dataclass
class _Live:
    """A sequence the engine holds, and what it has handed out."""

    sequence: Sequence
    on_token: Optional[Callable]  # (token, logprob, top) -> stop?
    on_finish: Optional[Callable]  # (Output) -> None
    output: Output = field(default_factory=Output)
    position: int = 0  # host's copy of the position of the row's next input token
    delivered: int = 0  # tokens handed to on_token


class DecodeEngine(Replica):
    """Sequences through a KV-cache model (of one rank, or sharded over TP), continuously
    batched."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, max_batch_size: int,
                 max_sequence_length: int, device: str, seed: int = 1234,
                 graphs: Optional[bool] = None, sync_every: int = 8):
        super().__init__(device)
        self.model = model
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        self.kv = KVModel(model, max_batch_size, max_sequence_length, compile=self.graphs)
        self.vocab_size = vocab_size
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.sync_every = sync_every
        self.generator = torch.Generator().manual_seed(seed)  # keys of unseeded sequences
        rows, dev = max_batch_size, self.device
        self.token = torch.zeros(rows, dtype=torch.long, device=dev)
        self.position = torch.zeros(rows, dtype=torch.long, device=dev)
        self.made = torch.zeros(rows, dtype=torch.long, device=dev)
        self.budget = torch.zeros(rows, dtype=torch.long, device=dev)
        self.active = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.stops = torch.full((rows, _STOP_WIDTH), -1, dtype=torch.long, device=dev)
        self.out = torch.zeros(rows, max_sequence_length, dtype=torch.long, device=dev)
        self.out_logprob: Optional[torch.Tensor] = None
        self.out_top: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.sampling = RowSampling(rows, vocab_size, dev)
        self.rows: list[Optional[_Live]] = [None] * rows
        self.waiting: deque[_Live] = deque()
        self._graphs: dict = {}
        self._pool = None
        self.followed = torch.distributed.get_world_size(self.group) > 1
        self._round = _Round()  # the driver's news for its followers

    # The interface every engine has ---------------------------------------------------------

    def add(self, sequence: Sequence, on_token: Optional[Callable] = None,
            on_finish: Optional[Callable] = None) -> None:
        """Queue a sequence; `on_token(token, logprob, top) -> stop?` and `on_finish(Output)`
        are called from `advance`."""
        check_batch([sequence], self.max_batch_size, self.max_sequence_length, self.vocab_size)
        self.waiting.append(_Live(sequence, on_token, on_finish))
        if self.followed:
            self._round.added.append(sequence)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    def advance(self) -> None:
        """Admit waiting sequences into free rows, then run up to `sync_every` decode steps and
        hand out what they made (the driver: with its followers)."""
        if self.followed:
            news, self._round = self._round, _Round()
            self._broadcast_object(news)
        self._advance()

    def stop_followers(self) -> None:
        """Driver: release the followers, first telling them of the rows its callbacks ended in
        the last `advance` (they would hold those rows into the next run otherwise)."""
        if self._round.stopped or self._round.abort:
            self.advance()
        super().stop_followers()

    def _run_batch(self, news: _Round) -> None:
        """A follower's `advance`: the driver's news, then the same steps."""
        if news.abort:
            self.abort()
        for row in news.stopped:
            if self.rows[row] is not None:
                self.active[row] = False
                self._finish(row)
        for sequence in news.added:
            self.waiting.append(_Live(sequence, None, None))
        self._advance()

    def _advance(self) -> None:
        self._admit()
        live = [r for r, s in enumerate(self.rows) if s is not None]
        if not live:
            return
        steps = min(self.sync_every, max(self.rows[r].sequence.max_new_tokens -
                                         self.rows[r].delivered for r in live))
        n = _bucket(live[-1] + 1, 1, self.max_batch_size)
        longest = max(self.rows[r].position for r in live) + steps
        span = min(-(-longest // _SPAN) * _SPAN, self.max_sequence_length)
        top = max((self.rows[r].sequence.logprobs for r in live
                   if self.rows[r].sequence.logprobs is not None), default=None)
        mode = (Mode.of([self.rows[r].sequence.sampling for r in live]), top is not None)
        if top is not None and self.out_logprob is None:
            self._keep_logprobs()
        self._steps(n, span, mode, steps)
        for r in live:
            self.rows[r].position += steps
        self._deliver(live)

    def abort(self) -> None:
        """Drop every sequence, waiting or running, unanswered (after a failed `advance`)."""
        self.waiting.clear()
        self.rows = [None] * self.max_batch_size
        self.active.zero_()
        if self.followed and self.is_driver:
            self._round = _Round(abort=True)

    def generate(self, batch: list[Sequence], on_token: Optional[OnToken] = None,
                 on_finish: Optional[OnFinish] = None) -> list[Output]:
        """Run a batch to its end (the callbacks get the row's index in `batch`)."""
        check_batch(batch, self.max_batch_size, self.max_sequence_length, self.vocab_size)
        outputs: list[Optional[Output]] = [None] * len(batch)
        for i, s in enumerate(batch):
            def finished(output, i=i):
                outputs[i] = output
                if on_finish is not None:
                    on_finish(i, output)
            token = None if on_token is None else (lambda t, lp, top, i=i: on_token(i, t, lp, top))
            self.add(s, token, finished)
        while self.busy:
            self.advance()
        return outputs

    def warm_up(self) -> None:
        """Compile the decode step for one row and for several before the first request (a
        server's): Inductor specialises a size of 1, so without this the first batch of two or
        more waits seconds for a compilation while its clients wait for their first token.
        (On a CPU the same few eager steps.)"""
        greedy = Sampling(temperature=0, seed=0)
        for rows in sorted({1, min(2, self.max_batch_size)}):
            self.generate([Sequence([0] * (2 + i), 2, greedy) for i in range(rows)])

    # Admission and prefill ------------------------------------------------------------------

    def _admit(self) -> None:
        free = [r for r, s in enumerate(self.rows) if s is None]
        admitted = []
        while self.waiting and free:
            live = self.waiting.popleft()
            row = free.pop(0)
            self.rows[row] = live
            admitted.append(row)
        if not admitted:
            return
        seqs = [self.rows[r].sequence for r in admitted]
        self._start_rows(admitted, seqs)
        # Longest prompts together, so padding stays small.
        order = sorted(admitted, key=lambda r: len(self.rows[r].sequence.prompt))
        for want in (False, True):  # the prompt's log-probabilities need every logit
            chunk = []
            for r in order:
                s = self.rows[r].sequence
                if len(s.prompt) == 1 or bool(s.prompt_logprobs) != want:
                    continue
                if chunk and (len(chunk) + 1) * (len(s.prompt) - 1) > _PREFILL_TOKENS:
                    self._prefill(chunk, want)
                    chunk = []
                chunk.append(r)
            if chunk:
                self._prefill(chunk, want)
        for r in admitted:
            live = self.rows[r]
            if live.sequence.max_new_tokens == 0:  # scoring only: answered now
                self._finish(r)

    def _start_rows(self, rows: list[int], seqs: list[Sequence]) -> None:
        """The device state of rows that start new sequences."""
        dev = self.device
        index = torch.tensor(rows, device=dev)
        width = _bucket(max(len(s.stop_ids) for s in seqs), _STOP_WIDTH, 1 << 20)
        if width > self.stops.size(1):  # a new width: new addresses, new graphs
            self.stops = torch.nn.functional.pad(self.stops, (0, width - self.stops.size(1)),
                                                 value=-1)
            self._graphs.clear()
        stops = [list(s.stop_ids) + [-1] * (self.stops.size(1) - len(s.stop_ids)) for s in seqs]
        self.stops[index] = torch.tensor(stops, dtype=torch.long, device=dev)
        self.token[index] = torch.tensor([s.prompt[-1] for s in seqs], device=dev)
        self.position[index] = torch.tensor([len(s.prompt) - 1 for s in seqs], device=dev)
        self.made[index] = 0
        self.budget[index] = torch.tensor([s.max_new_tokens for s in seqs], device=dev)
        self.active[index] = torch.tensor([s.max_new_tokens > 0 for s in seqs], device=dev)
        self.sampling.set(index, [s.sampling for s in seqs], row_keys(seqs, self.generator),
                          [s.prompt for s in seqs])
        for r, s in zip(rows, seqs):
            live = self.rows[r]
            live.position = len(s.prompt) - 1
            if s.logprobs is not None:
                live.output.logprobs, live.output.top_logprobs = [], []
            if s.prompt_logprobs:
                live.output.prompt_logprobs, live.output.prompt_top_logprobs = [None], [None]

    @torch.inference_mode()
    def _prefill(self, rows: list[int], want_logits: bool) -> None:
        """The KV cache of `rows` from their prompts but the last token (which the first decode
        step reads); the prompt's log-probabilities where they are asked for."""
        seqs = [self.rows[r].sequence for r in rows]
        length = max(len(s.prompt) for s in seqs) - 1
        ids = [s.prompt[:-1] + [0] * (length - len(s.prompt) + 1) for s in seqs]
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        logits = self.kv.prefill(torch.tensor(rows, device=self.device), tokens, want_logits)
        if not want_logits:
            return
        logits = logits[:, :, :self.vocab_size].float()
        for i, (r, s) in enumerate(zip(rows, seqs)):
            count = len(s.prompt) - 1
            log_probs = torch.log_softmax(logits[i, :count], dim=-1)
            targets = torch.tensor(s.prompt[1:], device=self.device)
            out = self.rows[r].output
            out.prompt_logprobs += log_probs.gather(1, targets[:, None])[:, 0].tolist()
            tops = [None] * count
            if s.logprobs:
                values, ids = torch.topk(log_probs, s.logprobs, dim=-1)
                tops = [list(zip(a, b)) for a, b in zip(ids.tolist(), values.tolist())]
            out.prompt_top_logprobs += tops

    # Decode steps ---------------------------------------------------------------------------

    def _keep_logprobs(self) -> None:
        rows, length, dev = self.max_batch_size, self.max_sequence_length, self.device
        self.out_logprob = torch.zeros(rows, length, device=dev)
        self.out_top = (torch.zeros(rows, length, _MAX_TOP, dtype=torch.long, device=dev),
                        torch.zeros(rows, length, _MAX_TOP, device=dev))

    def _step(self, n: int, span: int, mode: tuple) -> None:
        """One decode step of rows 0..n-1, entirely on the device."""
        sampling_mode, logprobs = mode
        position = self.position[:n]
        logits = self.kv.decode(self.token[:n], position, span)[:, :self.vocab_size].float()
        chosen = self.sampling.choose(logits, position, sampling_mode)
        active = self.active[:n]
        rows = torch.arange(n, device=self.device)
        column = self.made[:n].clamp(max=self.max_sequence_length - 1)
        self.out[rows, column] = torch.where(active, chosen, self.out[rows, column])
        if logprobs:
            log_probs = torch.log_softmax(logits, dim=-1)
            self.out_logprob[rows, column] = log_probs.gather(1, chosen[:, None])[:, 0]
            values, ids = torch.topk(log_probs, _MAX_TOP, dim=-1)
            self.out_top[0][rows, column] = ids
            self.out_top[1][rows, column] = values
        if sampling_mode.penalty:
            self.sampling.saw(chosen, active)
        self.made[:n] += active.long()
        stopped = (chosen[:, None] == self.stops[:n]).any(dim=-1)
        self.active[:n] = active & ~stopped & (self.made[:n] < self.budget[:n])
        self.token[:n] = chosen
        self.position[:n] = (position + 1).clamp(max=self.max_sequence_length - 1)

    @torch.inference_mode()
    def _steps(self, n: int, span: int, mode: tuple, count: int) -> None:
        if not self.graphs:
            for _ in range(count):
                self._step(n, span, mode)
            return
        graph = self._graphs.get((n, span, mode))
        if graph is None:
            graph = self._graphs[(n, span, mode)] = self._capture(n, span, mode)
        for _ in range(count):
            graph.replay()

    def _capture(self, n: int, span: int, mode: tuple) -> "torch.cuda.CUDAGraph":
        """The step of this shape as a CUDA graph. A warm-up step runs first (on a side stream,
        as capture needs); the row state it advanced is put back, and what else it wrote (the
        cache at the current positions, the outputs at the current columns) the first replay
        writes again, identically."""
        saved = [t.clone() for t in (self.token, self.position, self.made, self.active)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(n, span, mode)
        torch.cuda.current_stream().wait_stream(stream)
        for target, value in zip((self.token, self.position, self.made, self.active), saved):
            target.copy_(value)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(n, span, mode)
        return graph

    # Handing out ----------------------------------------------------------------------------

    def _deliver(self, live: list[int]) -> None:
        """Hand each live row's new tokens to its callback; answer the finished ones."""
        top = max(live) + 1
        made = self.made[:top].tolist()
        active = self.active[:top].tolist()
        low = min(self.rows[r].delivered for r in live)
        high = max(made[r] for r in live)
        if high > low:
            tokens = self.out[:top, low:high].tolist()
            logprobs = (self.out_logprob[:top, low:high].tolist()
                        if self.out_logprob is not None else None)
            needs_top = any((self.rows[r].sequence.logprobs or 0) > 0 for r in live)
            tops = None
            if needs_top:
                tops = (self.out_top[0][:top, low:high].tolist(),
                        self.out_top[1][:top, low:high].tolist())
        for r in live:
            s, entry = self.rows[r].sequence, self.rows[r]
            stopped = False
            while entry.delivered < made[r] and not stopped:
                j = entry.delivered - low
                token = tokens[r][j]
                value, best = None, None
                if s.logprobs is not None:
                    value = logprobs[r][j]
                    if s.logprobs:
                        best = list(zip(tops[0][r][j][:s.logprobs], tops[1][r][j][:s.logprobs]))
                    entry.output.logprobs.append(value)
                    entry.output.top_logprobs.append(best)
                entry.output.tokens.append(token)
                entry.delivered += 1
                stopped = entry.on_token is not None and entry.on_token(token, value, best)
                if stopped or token in s.stop_ids:
                    entry.output.finish_reason = "stop"
            if stopped or not active[r]:
                if stopped:
                    self.active[r] = False
                    if self.followed:
                        self._round.stopped.append(r)
                self._finish(r)

    def _finish(self, row: int) -> None:
        live = self.rows[row]
        self.rows[row] = None
        if live.on_finish is not None:
            live.on_finish(live.output)
