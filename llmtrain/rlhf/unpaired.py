"""Unpaired examples (stage=kto) as training samples. Each sample is two rows laid out like an
SFT sequence (inputs ids[:-1], labels ids[1:], loss mask on the completion's labels), padded to
seq_length: the example itself, and its prompt joined with the completion of another example of
the same step's batch (the next one whose prompt differs), from which KTO estimates its
reference point, the KL between the policy and the reference, as the paper does. Samples of step
k are k*G .. (k+1)*G-1 of an endless, per-epoch reshuffled order (llmtrain.rlhf.pairs), so a
resumed run continues exactly."""

from __future__ import annotations

from typing import Optional

import numpy as np

from llmtrain.config.schema import Config
from llmtrain.data import chat
from llmtrain.data.sft import split_samples
from llmtrain.data.sources import DataError
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.rlhf.pairs import PairDataset, pad_id
from llmtrain.rlhf.records import Unpaired, encode_unpaired, read, unpaired_arithmetic


def load_examples(cfg: Config, tokenizer: Tokenizer) -> tuple[list[Unpaired], str]:
    """The training split's examples that keep a completion token within seq_length, and a line
    that describes them (with the paper's advice on the desirable/undesirable balance)."""
    template = chat.load_template(cfg.data.sft.chat_template, tokenizer)
    examples = [encode_unpaired(record, where, template, tokenizer, cfg.data.sft.system)
                for where, record in read([str(e) for e in cfg.data.data_path],
                                          generated=unpaired_arithmetic)]
    if not examples:
        raise DataError(f"{', '.join(map(str, cfg.data.data_path))}: no unpaired examples found")
    train = split_samples(len(examples), cfg.data.split, cfg.seed)[0]
    kept = [examples[i] for i in map(int, train)
            if 1 in examples[i].mask[:cfg.data.seq_length + 1 - len(examples[i].prompt)]]
    if not kept:
        raise DataError(f"no unpaired example keeps a completion token within data.seq_length="
                        f"{cfg.data.seq_length}: raise seq_length")
    desirable = sum(e.desirable for e in kept)
    text = (f"unpaired data: {len(examples)} examples, {len(kept)} for training "
            f"({desirable} desirable, {len(kept) - desirable} undesirable)")
    if len(train) > len(kept):
        text += f"; {len(train) - len(kept)} dropped (no completion token within seq_length)"
    a = cfg.stage.alignment
    if desirable and len(kept) > desirable:
        balance = a.desirable_weight * desirable / (a.undesirable_weight * (len(kept) - desirable))
        text += (f"; desirable_weight x desirable / (undesirable_weight x undesirable) = "
                 f"{balance:.2f} (the KTO paper advises 1 to 4/3)")
    return kept, text


class UnpairedDataset(PairDataset):
    """Items as PairDataset's (row 0: the example, row 1: its prompt with a mismatched
    completion), and `desirable`."""

    def __init__(self, examples: list[Unpaired], seq_length: int, num_samples: int,
                 global_batch_size: int, seed: int, pad_id: int, attention_mask: bool):
        super().__init__(examples, seq_length, num_samples, seed, pad_id, attention_mask)
        self.global_batch_size = global_batch_size

    def mismatched(self, index: int) -> int:
        """The example whose completion row 1 of sample `index` takes: the next one in the
        step's batch (of at least 2) whose prompt differs (the next one when all prompts are the
        same)."""
        step = index - index % self.global_batch_size
        own = self.pairs[self.pair_index(index)].prompt
        candidates = [self.pair_index(step + (index - step + k) % self.global_batch_size)
                      for k in range(1, self.global_batch_size)]
        return next((c for c in candidates if self.pairs[c].prompt != own), candidates[0])

    def __getitem__(self, index: int) -> dict:
        example = self.pairs[self.pair_index(index)]
        other = self.pairs[self.mismatched(index)]
        rows = [(example.prompt + example.completion, [0] * len(example.prompt) + example.mask),
                (example.prompt + other.completion, [0] * len(example.prompt) + other.mask)]
        out = self.rows(rows)
        out["desirable"] = np.bool_(example.desirable)
        return out


def build_unpaired_dataset(cfg: Config, tokenizer: Tokenizer, device: str,
                           num_samples: Optional[int] = None) -> tuple[UnpairedDataset, str]:
    examples, text = load_examples(cfg, tokenizer)
    samples = num_samples or cfg.stage.train_iters * cfg.stage.global_batch_size
    return UnpairedDataset(examples, cfg.data.seq_length, samples, cfg.stage.global_batch_size,
                           cfg.seed, pad_id(tokenizer), attention_mask=device == "cpu"), text
