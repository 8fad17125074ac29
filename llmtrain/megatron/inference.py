"""Text generation on Megatron-Core's inference machinery, with a KV cache, under any TP x PP.

The model runs through Megatron-Core's `GPTInferenceWrapper` (prefill and decode windows, logits
gathered over TP, activations passed between pipeline stages) with a `StaticInferenceContext`
(the KV cache, allocated once for `max_batch_size` x `max_sequence_length`). The loop around it is
the one Megatron's static `TextGenerationController` runs (prefill up to the shortest prompt, then
one position at a time, longer prompts fed their own tokens until they start generating), written
here because that controller samples a whole batch with one set of parameters, over the padded
vocabulary, without a repetition penalty, and needs CUDA events; and Megatron's dynamic engine
needs flash-attention kernels (GPU only). Here every sequence of a batch has its own sampling
parameters, length and stop tokens, and the logits are cut to the real vocabulary first.

One rank of each model replica (its TP x PP ranks), the driver (last pipeline stage, first TP
rank: the one that holds the whole logits), samples and broadcasts each step's tokens and
finished flags to the replica's other ranks; they follow (`Replica.follow`, which the reward
model's Scorer shares). Batches reach them the same way, so the driver alone talks to users.
Data-parallel replicas (GRPO and PPO rollouts) generate independently, each its own batches.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
    GPTInferenceWrapper,
)

from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config
from llmtrain.generate.sampler import Mode, RowSampling, row_keys
from llmtrain.generate.sequence import OnFinish, OnToken, Output, Sequence, check_batch
from llmtrain.megatron import checkpoint, lora, lora_checkpoint
from llmtrain.megatron.model import build_model, params_dtype
from llmtrain.megatron.replica import Replica

def load_model(cfg: Config, layout: Layout, root: str, iteration: int) -> torch.nn.Module:
    """The training builder's model with its weights from a checkpoint, every tensor in the
    precision's format (as Megatron-LM's inference and transformers run a bf16 model), in eval
    mode. Inference has no interleaved pipeline: one chunk per rank. LoRA adapters (a peft=lora
    run's step, or a PEFT folder: peft_load) stay apart from the base, unmerged: both engines
    add them to their layers' products, as training's forward does."""
    if layout.virtual_pipeline_model_parallel_size:
        raise ValueError("generation runs without virtual pipeline stages")
    chunks = [chunk.to(params_dtype(cfg)) for chunk in build_model(cfg, layout)]
    adapter = lora_checkpoint.adapter_of(Path(root), iteration)
    if adapter is None:
        checkpoint.load(root, iteration, chunks, None, None, weights_only=True)
    else:  # a peft=lora run's step: its base, and its adapters beside it
        lora_checkpoint.load_with_adapters(root, iteration, chunks, *adapter)
    if cfg.peft.load:  # peft_load: a PEFT folder's adapters onto this base
        lora.add_adapters(chunks, cfg.peft, 0)
        lora_checkpoint.load_peft(chunks, cfg.peft.load)
    # One position per step is bound by launch overhead: the compiled bias-dropout-add (nothing
    # to fuse at inference) costs more than it saves (Llama 3.2 1B on an H100: 34 -> 44 tok/s).
    chunks[0].config.bias_dropout_fusion = False
    chunks[0].eval()
    return chunks[0]


class Engine(Replica):
    """Batches of sequences through the model, collectively on every rank of the model."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, max_batch_size: int,
                 max_sequence_length: int, device: str, seed: int = 1234):
        super().__init__(device)
        self.model = model
        self.vocab_size = vocab_size
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.context = StaticInferenceContext(max_batch_size, max_sequence_length)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.wrapper = GPTInferenceWrapper(model, self.context)
        self.generator = torch.Generator().manual_seed(seed)  # keys of unseeded sequences
        self.waiting: list = []  # (sequence, on_token, on_finish) queued by `add`

    def generate(self, batch: list[Sequence], on_token: Optional[OnToken] = None,
                 on_finish: Optional[OnFinish] = None) -> list[Output]:
        """Driver: run one batch (at most max_batch_size sequences) on every rank."""
        check_batch(batch, self.max_batch_size, self.max_sequence_length, self.vocab_size)
        self._broadcast_object(batch)
        return self._run(batch, on_token, on_finish)

    # The interface of the continuously batching engine (llmtrain.megatron.decode_engine), on
    # static batches: what waits when one starts joins the next.

    def warm_up(self) -> None:
        """Nothing to compile ahead: Megatron-Core's engine runs eagerly."""

    def add(self, sequence: Sequence, on_token=None, on_finish=None) -> None:
        """Driver: queue a sequence; `on_token(token, logprob, top) -> stop?` and
        `on_finish(Output)` are called from `advance`."""
        check_batch([sequence], self.max_batch_size, self.max_sequence_length, self.vocab_size)
        self.waiting.append((sequence, on_token, on_finish))

    @property
    def busy(self) -> bool:
        return bool(self.waiting)

    def advance(self) -> None:
        """Driver: run the next batch of waiting sequences to its end."""
        batch, self.waiting = (self.waiting[:self.max_batch_size],
                               self.waiting[self.max_batch_size:])

        def on_token(row, token, logprob, top):
            call = batch[row][1]
            return call is not None and call(token, logprob, top)

        def on_finish(row, output):
            if batch[row][2] is not None:
                batch[row][2](output)

        self.generate([s for s, _, _ in batch], on_token, on_finish)

    def abort(self) -> None:
        """Driver: drop what waits, unanswered (after a failed `advance`)."""
        self.waiting = []

    def _run_batch(self, batch: list[Sequence]) -> None:
        self._run(batch, None, None)

    # The generation loop ----------------------------------------------------------------------

    @torch.inference_mode()
    def _run(self, batch: list[Sequence], on_token: Optional[OnToken],
             on_finish: Optional[OnFinish]) -> list[Output]:
        """Every rank: prefill, then one position per step until every sequence is finished.
        Per-sequence bookkeeping is in Python lists; the tensors stay on the device."""
        size = len(batch)
        lengths = [len(s.prompt) for s in batch]
        budget = [s.max_new_tokens for s in batch]
        total = max(n + b for n, b in zip(lengths, budget))
        rows = [s.prompt + [0] * (total - len(s.prompt)) for s in batch]
        tokens = torch.tensor(rows, dtype=torch.long, device=self.device)
        outputs = [Output() for _ in batch]
        if self.is_driver:
            for s, out in zip(batch, outputs):
                if s.logprobs is not None:
                    out.logprobs, out.top_logprobs = [], []
                if s.prompt_logprobs:
                    out.prompt_logprobs, out.prompt_top_logprobs = [None], [None]
        generating = [n for n, b in zip(lengths, budget) if b > 0]
        # Prefill up to the shortest prompt that generates (all prompts when none does: right
        # padding cannot change what a causal model computes before it).
        start, end = 0, min(generating) if generating else max(lengths)
        done = [False] * size
        self.wrapper.prep_model_for_inference()  # eval mode, KV cache offsets reset
        inputs = self.wrapper.prep_inference_input(tokens)
        all_logits = any(s.prompt_logprobs for s in batch)
        sampling, mode = None, Mode.of([s.sampling for s in batch])
        if self.is_driver:
            sampling = RowSampling(size, self.vocab_size, self.device)
            sampling.set(torch.arange(size, device=self.device), [s.sampling for s in batch],
                         row_keys(batch, self.generator), [s.prompt for s in batch])
        while True:
            self.context.config.materialize_only_last_token_logits = not (all_logits and
                                                                          start == 0)
            window = self.wrapper.get_batch_for_context_window(inputs, start, end)
            logits = self.wrapper.run_one_forward_step(window)
            if self.is_driver:
                logits = logits[:size, :, :self.vocab_size].float()
                if logits.size(1) > 1:
                    self._prompt_logprobs(batch, outputs, logits[:, :-1], tokens, start)
                chosen, finished = self._step(batch, outputs, logits[:, -1], tokens, end, done,
                                              on_token, sampling, mode)
            else:
                chosen = torch.empty(size, dtype=torch.long, device=self.device)
                finished = None
            chosen, finished = self._share(chosen, finished)
            if end < total:
                tokens[:, end] = chosen
            for row in range(size):
                if finished[row] and not done[row]:
                    done[row] = True
                    if self.is_driver:
                        count = min(max(end - lengths[row] + 1, 0), budget[row])
                        outputs[row].tokens = tokens[row, lengths[row]:lengths[row] + count
                                                     ].tolist()
                        if on_finish is not None:
                            on_finish(row, outputs[row])
            if all(done) or end >= total:
                break
            start, end = end, end + 1
        self.context.reset()
        return outputs

    def _share(self, chosen: torch.Tensor, finished: Optional[list[bool]]
               ) -> tuple[torch.Tensor, list[bool]]:
        """The driver's tokens and finished flags of this step, on every rank."""
        if dist.get_world_size(self.group) == 1:
            return chosen, finished
        flags = torch.tensor(finished if finished is not None else [False] * len(chosen),
                             dtype=torch.bool, device=self.device)
        dist.broadcast(chosen, src=self.driver, group=self.group)
        dist.broadcast(flags, src=self.driver, group=self.group)
        return chosen, flags.tolist()

    def _prompt_logprobs(self, batch, outputs, logits, tokens, start) -> None:
        """Log-probabilities of prompt tokens start+1 .. start+n-1 from all positions' logits but
        the last (which `_step` handles like any later position)."""
        for row, s in enumerate(batch):
            if not s.prompt_logprobs:
                continue
            last = min(start + logits.size(1), len(s.prompt) - 1)  # last target position
            if last <= start:
                continue
            log_probs = torch.log_softmax(logits[row, :last - start], dim=-1)
            targets = tokens[row, start + 1:last + 1]
            picked = log_probs.gather(1, targets[:, None])[:, 0].tolist()
            outputs[row].prompt_logprobs.extend(picked)
            outputs[row].prompt_top_logprobs.extend(
                self._top(log_probs, s.logprobs) or [None] * len(picked))

    @staticmethod
    def _top(log_probs: torch.Tensor, n: Optional[int]) -> Optional[list]:
        """[(token, log-probability)] x n per row, most likely first (None for n 0 or None)."""
        if not n:
            return None
        values, ids = torch.topk(log_probs, n, dim=-1)
        return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]

    def _step(self, batch, outputs, last, tokens, end, done, on_token, sampling, mode):
        """Driver: the token of position `end` for every row (its own prompt token while it
        still reads its prompt), log-probabilities where asked, and which rows are finished."""
        size = len(batch)
        reading = [len(s.prompt) > end for s in batch]
        chosen = tokens[:, end].clone() if end < tokens.size(1) else torch.zeros(
            size, dtype=torch.long, device=self.device)
        active = [r for r, s in enumerate(batch)
                  if not reading[r] and not done[r] and s.max_new_tokens > 0]
        if active:
            index = torch.tensor(active, device=self.device)
            # The same draws as the decode engine's: keyed by the input token's position.
            drawn = sampling.choose(last, torch.full((size,), end - 1, device=self.device), mode)
            chosen[index] = drawn[index]
            if mode.penalty:
                sampling.saw(chosen, torch.isin(torch.arange(size, device=self.device), index))
        # Log-probabilities: of generated tokens, and of prompt tokens when scoring.
        need = [r for r in range(size) if (r in active and batch[r].logprobs is not None)
                or (reading[r] and batch[r].prompt_logprobs)]
        picked = {}
        if need:
            index = torch.tensor(need, device=self.device)
            log_probs = torch.log_softmax(last[index], dim=-1)
            values = log_probs.gather(1, chosen[index][:, None])[:, 0].tolist()
            tops = self._top(log_probs, max(batch[r].logprobs or 0 for r in need))
            for i, row in enumerate(need):
                n = batch[row].logprobs or 0
                picked[row] = (values[i], tops[i][:n] if tops and n else None)
        for row, (value, top) in picked.items():
            out = outputs[row]
            if reading[row]:
                out.prompt_logprobs.append(value)
                out.prompt_top_logprobs.append(top)
            else:
                out.logprobs.append(value)
                out.top_logprobs.append(top)
        tokens_now = chosen.tolist()
        finished = list(done)
        for row in active:
            s = batch[row]
            value, top = picked.get(row, (None, None))
            stop = on_token is not None and on_token(row, tokens_now[row], value, top)
            if stop or tokens_now[row] in s.stop_ids:
                outputs[row].finish_reason = "stop"
            if stop or tokens_now[row] in s.stop_ids or \
                    end - len(s.prompt) + 1 >= s.max_new_tokens:
                finished[row] = True
        for row, s in enumerate(batch):
            # Sequences that only score their prompt are finished once its last token is.
            if s.max_new_tokens == 0 and len(s.prompt) <= end + 1:
                finished[row] = True
        return chosen, finished


ENGINES = ("auto", "megatron")


def make_engine(model: torch.nn.Module, vocab_size: int, max_batch_size: int,
                max_sequence_length: int, device: str, seed: int, kind: str = "auto"):
    """The decode engine (continuous batching, CUDA graphs on a GPU) where it covers the model
    and its layout, else Megatron-Core's (`kind`: auto | megatron). `.description` says which,
    and why."""
    from llmtrain.megatron.decode_engine import DecodeEngine
    from llmtrain.megatron.kv_model import unsupported

    why = unsupported(model) if kind == "auto" else f"engine={kind}"
    if why is None:
        engine = DecodeEngine(model, vocab_size, max_batch_size, max_sequence_length, device,
                              seed)
        engine.description = ("decode engine, continuous batching"
                              + (", CUDA graphs" if engine.graphs else ""))
        return engine
    engine = Engine(model, vocab_size, max_batch_size, max_sequence_length, device, seed)
    engine.description = f"Megatron-Core's engine, static batches ({why})"
    return engine


def load_engine(cfg: Config, layout: Layout, root: str, iteration: int, max_batch_size: int,
                max_sequence_length: int, kind: str = "auto"):
    """The engine of a checkpoint (on every rank, after parallel.initialize)."""
    model = load_model(cfg, layout, root, iteration)
    return make_engine(model, cfg.model.vocab_size, max_batch_size, max_sequence_length,
                       layout.device, cfg.seed, kind)

