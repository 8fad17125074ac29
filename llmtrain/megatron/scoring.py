"""A reward model's scores for a server (`python -m llmtrain.serve` of a stage=rm checkpoint):
batches of token sequences through the model under any TP x PP, one score per sequence, read
where stage=rm trained it and where GRPO and PPO read a frozen reward model's: at the last
position of what the model reads."""

from __future__ import annotations

import torch

from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config
from llmtrain.megatron.align.heads import causal_inputs, load_frozen, score_forward
from llmtrain.megatron.replica import Replica


class Scorer(Replica):
    """Scores of batches of token sequences, collectively on every rank of the model."""

    def __init__(self, role, vocab_size: int, max_batch_size: int, max_sequence_length: int,
                 device: str):
        super().__init__(device)
        self.role = role
        self.vocab_size = vocab_size
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length

    @classmethod
    def load(cls, cfg: Config, layout: Layout, root: str, iteration: int, max_batch_size: int,
             max_sequence_length: int) -> "Scorer":
        """The scorer of a reward model's checkpoint (on every rank, after parallel.initialize)."""
        role = load_frozen(cfg, layout, root, scalar=True, say=lambda _: None, step=iteration)
        return cls(role, cfg.model.vocab_size, max_batch_size, max_sequence_length,
                   layout.device)

    def problems(self, batch: list[list[int]]) -> list[str]:
        """What keeps these sequences from being scored (empty: nothing)."""
        found = []
        for i, ids in enumerate(batch):
            if not 0 < len(ids) <= self.max_sequence_length:
                found.append(f"sequence {i} has {len(ids)} tokens; 1 to "
                             f"{self.max_sequence_length} (inference_max_seq_length) can be "
                             f"scored")
            elif min(ids) < 0 or max(ids) >= self.vocab_size:
                found.append(f"sequence {i}: token ids must lie in 0..{self.vocab_size - 1}")
        return found

    def score(self, batch: list[list[int]]) -> list[float]:
        """Driver: the score of each sequence (at most max_batch_size of them, each without
        problems), on every rank of the model."""
        self._broadcast_object(batch)
        return self._run_batch(batch)

    @torch.inference_mode()
    def _run_batch(self, batch: list[list[int]]) -> list[float]:
        """Every rank: one forward pass of the batch, right-padded to its longest sequence
        (padding after a position cannot change what a causal model computes there)."""
        length = max(map(len, batch))
        micro = {"tokens": torch.tensor([ids + [0] * (length - len(ids)) for ids in batch]),
                 "last": torch.tensor([len(ids) - 1 for ids in batch]),
                 **causal_inputs(len(batch), length, self.device.type)}
        schedule = dict(num_microbatches=1, seq_length=length, micro_batch_size=len(batch),
                        device=self.device.type)
        reports = self.role.forward([micro], schedule, score_forward)
        return reports[0]["score"].tolist() if reports else []
