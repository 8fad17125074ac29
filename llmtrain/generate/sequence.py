"""A sequence to generate, how its tokens are chosen, and what it produced: what callers hand the
engine (llmtrain.megatron.inference) and get back, free of Megatron."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 (or top_k 1) is greedy; top_k and top_p
    restrict the candidates (top-k first, then top-p); repetition_penalty > 1 makes
    tokens already in the sequence less likely (as transformers' RepetitionPenaltyLogitsProcessor:
    positive logits divided by it, negative ones multiplied)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    repetition_penalty: float = 1.0
    # A seed of the sequence's own (reproducible whatever it is batched with); None: the engine's
    # generator.
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class Sequence:
    """One sequence to continue: what a batch is made of."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop_ids: tuple[int, ...] = ()
    # None: no log-probabilities; n >= 0: the chosen token's and the n most likely ones'.
    logprobs: Optional[int] = None
    # Log-probabilities of the prompt's tokens too (scoring; echo in the OpenAI API).
    prompt_logprobs: bool = False


@dataclass
class Output:
    """What a sequence produced. Log-probabilities are of the model's own distribution (before
    temperature, top-k/top-p and penalties); `prompt_logprobs[0]` is None (nothing predicts the
    first token). `top_logprobs` entries are (token, log-probability), most likely first."""

    tokens: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # length | stop
    logprobs: Optional[list[float]] = None
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None
    prompt_logprobs: Optional[list[Optional[float]]] = None
    prompt_top_logprobs: Optional[list[Optional[list[tuple[int, float]]]]] = None

    def visible(self, stop_ids: tuple[int, ...]) -> list[int]:
        """The generated tokens without the end-of-sequence token that ended them."""
        if self.tokens and self.finish_reason == "stop" and self.tokens[-1] in stop_ids:
            return self.tokens[:-1]
        return self.tokens


# Called by the driver for each new token: (index in the batch, token, logprob, top logprobs).
# Returning True ends that sequence after this token (stop strings, a client gone).
OnToken = Callable[[int, int, Optional[float], Optional[list]], bool]
# Called by the driver when a sequence is finished, before the rest of its batch.
OnFinish = Callable[[int, Output], None]


def sampling_problems(s: Sampling, vocab_size: int) -> list[str]:
    """What is wrong with sampling parameters, in words (empty: nothing)."""
    problems = []
    if s.temperature < 0:
        problems.append(f"temperature={s.temperature} must be at least 0 (0: greedy)")
    if not 0 <= s.top_k < vocab_size:
        problems.append(f"top_k={s.top_k} must lie in 0..{vocab_size - 1} (0: off)")
    if not 0.0 <= s.top_p <= 1.0:
        problems.append(f"top_p={s.top_p} must lie in [0, 1] (0 or 1: off)")
    if s.repetition_penalty <= 0:
        problems.append(f"repetition_penalty={s.repetition_penalty} must be above 0 (1: off)")
    return problems


def check_batch(batch: list[Sequence], max_batch_size: int, max_sequence_length: int,
                vocab_size: int) -> None:
    """What every engine refuses before it runs anything."""
    if not 0 < len(batch) <= max_batch_size:
        raise ValueError(f"a batch holds 1 to {max_batch_size} sequences, not {len(batch)}")
    for s in batch:
        if not s.prompt:
            raise ValueError("a prompt needs at least one token")
        if len(s.prompt) + s.max_new_tokens > max_sequence_length:
            raise ValueError(f"{len(s.prompt)} prompt tokens + {s.max_new_tokens} to generate "
                             f"exceed the {max_sequence_length} tokens of the KV cache "
                             f"(max_sequence_length)")
        if max(s.prompt) >= vocab_size or min(s.prompt) < 0:
            raise ValueError(f"prompt token ids must lie in 0..{vocab_size - 1}")


def run_all(engine, sequences: list[Sequence],
            on_step: Optional[Callable[[list], None]] = None) -> list[Output]:
    """Every sequence through an engine at once, added in the given order (the decode engine
    refills each row as its sequence finishes; Megatron-Core's runs static batches of what
    waits); the outputs in that order. `on_step(outputs so far)` after each engine step."""
    outputs: list = [None] * len(sequences)
    for i, sequence in enumerate(sequences):
        engine.add(sequence, None, partial(outputs.__setitem__, i))
    while engine.busy:
        engine.advance()
        if on_step is not None:
            on_step(outputs)
    return outputs
