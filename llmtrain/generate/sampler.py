"""Next tokens for many sequences at once, each with its own sampling parameters, on the device,
with no host synchronisation (so that a decode step and its sampling fit in one CUDA graph).

Randomness is a counter-based hash of (the sequence's seed key, its position, the token id): a
seeded sequence draws the same tokens whatever it is batched with, and sequences with different
seeds draw independent streams. A token is the argmax of its logit plus Gumbel noise (the
Gumbel-max trick: exact sampling from the softmax). Unlike one uniform through the CDF, whose
choice moves when rounding anywhere in the vocabulary shifts the sum before it, this choice
changes only when two candidates nearly tie: rollouts on another layout (other rounding) draw
the same tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch

from llmtrain.generate.sequence import Sampling

_MASK = 0xFFFFFFFF


def seed_key(seed: int) -> int:
    """A 32-bit key of any integer seed (the API's seeds reach 2**64)."""
    return int.from_bytes(hashlib.blake2b(str(seed).encode(), digest_size=4).digest(), "little")


def row_keys(batch, generator: torch.Generator) -> list[int]:
    """Each sequence's key: of its own seed, else drawn from the engine's generator."""
    return [seed_key(s.sampling.seed) if s.sampling.seed is not None
            else int(torch.randint(0, 1 << 32, (1,), generator=generator)) for s in batch]


def _mix(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding 32-bit values (products wrap;
    their low 32 bits are exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK
    return x ^ (x >> 16)


def gumbel(keys: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Gumbel noise [rows, vocab] (fp32) from (key, position) of each row and the token id."""
    row = _mix(_mix(keys) ^ ((positions * 0x9E3779B1) & _MASK))
    ids = torch.arange(vocab_size, device=keys.device)
    h = _mix(row[:, None] ^ ((ids * 0x85EBCA77 + 0x27D4EB2F) & _MASK)[None, :])
    u = ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # in (0, 1), 24 exact bits
    return -torch.log(-torch.log(u))


@dataclass(frozen=True)
class Mode:
    """What a step's sampling needs, over all its rows (a CUDA graph each): repetition
    penalties, random draws, top-k/top-p filtering."""

    penalty: bool = False
    sample: bool = False
    filter: bool = False

    @staticmethod
    def of(samplings: list[Sampling]) -> "Mode":
        drawn = [s for s in samplings if not s.greedy]
        return Mode(penalty=any(s.repetition_penalty != 1.0 for s in samplings),
                    sample=bool(drawn),
                    filter=any(s.top_k > 0 or 0.0 < s.top_p < 1.0 for s in drawn))


class RowSampling:
    """The sampling parameters of each row of a batch, as device tensors (fixed addresses)."""

    def __init__(self, rows: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.temperature = torch.ones(rows, device=device)
        self.top_k = torch.zeros(rows, dtype=torch.long, device=device)
        self.top_p = torch.zeros(rows, device=device)
        self.greedy = torch.ones(rows, dtype=torch.bool, device=device)
        self.penalty = torch.ones(rows, device=device)
        self.key = torch.zeros(rows, dtype=torch.long, device=device)
        self.seen: Optional[torch.Tensor] = None  # [rows, vocab]: tokens in each sequence so far

    def set(self, rows: torch.Tensor, samplings: list[Sampling], keys: list[int],
            prompts: list[list[int]]) -> None:
        """Rows `rows` start new sequences."""
        device = self.temperature.device

        def put(target, values, dtype=None):
            target[rows] = torch.tensor(values, dtype=dtype or target.dtype, device=device)

        put(self.temperature, [s.temperature for s in samplings])
        put(self.top_k, [s.top_k for s in samplings])
        put(self.top_p, [s.top_p for s in samplings])
        put(self.greedy, [s.greedy for s in samplings])
        put(self.penalty, [s.repetition_penalty for s in samplings])
        put(self.key, keys)
        if any(s.repetition_penalty != 1.0 for s in samplings) and self.seen is None:
            self.seen = torch.zeros(self.temperature.size(0), self.vocab_size, dtype=torch.bool,
                                    device=device)
        if self.seen is not None:
            self.seen[rows] = False
            for row, prompt in zip(rows.tolist(), prompts):
                self.seen[row, torch.tensor(prompt, device=device)] = True

    def choose(self, logits: torch.Tensor, positions: torch.Tensor, mode: Mode) -> torch.Tensor:
        """Next token of rows 0..n-1 from their logits [n, vocab] (fp32, the real vocabulary)."""
        n = logits.size(0)
        if mode.penalty:
            penalty = self.penalty[:n, None]
            penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(self.seen[:n], penalized, logits)
        chosen = logits.argmax(dim=-1)
        if not mode.sample:
            return chosen
        greedy = self.greedy[:n]
        temperature = torch.where(greedy, 1.0, self.temperature[:n]).clamp_min(1e-6)
        scaled = logits / temperature[:, None]
        if mode.filter:
            values, order = scaled.sort(dim=-1, descending=True)
            ranks = torch.arange(values.size(1), device=values.device)[None, :]
            top_k = torch.where(self.top_k[:n] > 0, self.top_k[:n], values.size(1))
            keep = ranks < top_k[:, None]
            probs = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
            top_p = self.top_p[:n]
            top_p = torch.where((top_p > 0) & (top_p < 1), top_p, 2.0)
            # The smallest set whose probability reaches top_p (its first token always).
            keep &= (probs.cumsum(dim=-1) - probs) < top_p[:, None]
            scaled = scaled.masked_fill(~torch.zeros_like(keep).scatter(1, order, keep),
                                        float("-inf"))
        picked = (scaled + gumbel(self.key[:n], positions, scaled.size(1))).argmax(dim=-1)
        return torch.where(greedy, chosen, picked)

    def saw(self, tokens: torch.Tensor, active: torch.Tensor) -> None:
        """Rows 0..n-1 produced `tokens` (their repetition penalty counts them from now on)."""
        if self.seen is not None:
            rows = torch.arange(tokens.size(0), device=tokens.device)
            self.seen[rows, tokens] = self.seen[rows, tokens] | active
