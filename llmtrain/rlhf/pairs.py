"""Preference pairs as training samples: chosen and rejected conversation side by side, each
laid out like an SFT sequence (inputs ids[:-1], labels ids[1:], loss mask on the reply's labels),
padded to seq_length. Samples of step k are k*G .. (k+1)*G-1 of an endless, per-epoch reshuffled
order: a resumed run continues exactly."""

from __future__ import annotations

from typing import Optional

import numpy as np

from llmtrain.config.schema import Config
from llmtrain.data import chat
from llmtrain.data.sft import split_samples
from llmtrain.data.sources import DataError
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.rlhf.records import Encoded, encode_pair, read


def load_pairs(cfg: Config, tokenizer: Tokenizer) -> tuple[list[tuple[Encoded, Encoded]], str]:
    """The training split's pairs that keep a reply token within seq_length, and a line that
    describes them."""
    template = chat.load_template(cfg.data.sft.chat_template, tokenizer)
    pairs, dropped = [], 0
    for where, record in read([str(e) for e in cfg.data.data_path]):
        pairs.append(encode_pair(record, where, template, tokenizer, cfg.data.sft.system))
    if not pairs:
        raise DataError(f"{', '.join(map(str, cfg.data.data_path))}: no preference pairs found")
    train = split_samples(len(pairs), cfg.data.split, cfg.seed)[0]
    kept = []
    limit = cfg.data.seq_length + 1
    for i in map(int, train):
        if all(1 in p.mask[1:limit] for p in pairs[i]):
            kept.append(pairs[i])
        else:
            dropped += 1
    if not kept:
        raise DataError(f"no preference pair keeps a reply token within data.seq_length="
                        f"{cfg.data.seq_length}: raise seq_length")
    text = f"preference data: {len(pairs)} pairs, {len(kept)} for training"
    if dropped:
        text += f"; {dropped} dropped (no reply token within seq_length)"
    return kept, text


class PairDataset:
    """Items: tokens, labels, loss_mask, position_ids of shape [2, seq_length] (chosen, rejected),
    `last` (where a reward model scores each sequence: the position that predicts the reply's
    last token, the template's end token), `index` (the pair's number), and on CPU the causal
    attention mask."""

    def __init__(self, pairs: list[tuple[Encoded, Encoded]], seq_length: int, num_samples: int,
                 seed: int, pad_id: int, attention_mask: bool):
        self.pairs = pairs
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.seed = seed
        self.pad_id = pad_id
        self.attention_mask = attention_mask
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.num_samples

    def pair_index(self, index: int) -> int:
        epoch, k = divmod(index, len(self.pairs))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))
        return int(self._order[k])

    def rows(self, rows: list[tuple[list[int], list[int]]]) -> dict:
        """Sequences (token ids, loss mask) side by side, as the items' tensors."""
        s, n_rows = self.seq_length, len(rows)
        out = {"tokens": np.full((n_rows, s), self.pad_id, dtype=np.int64),
               "labels": np.full((n_rows, s), self.pad_id, dtype=np.int64),
               "loss_mask": np.zeros((n_rows, s), dtype=np.float32),
               "position_ids": np.tile(np.arange(s, dtype=np.int64), (n_rows, 1)),
               "last": np.zeros(n_rows, dtype=np.int64)}
        for row, (ids, mask) in enumerate(rows):
            ids = np.asarray(ids[:s + 1], dtype=np.int64)
            mask = np.asarray(mask[:s + 1], dtype=np.float32)
            n = len(ids) - 1
            out["tokens"][row, :n] = ids[:-1]
            out["labels"][row, :n] = ids[1:]
            out["loss_mask"][row, :n] = mask[1:]
            trained = np.flatnonzero(mask[1:])
            out["last"][row] = trained[-1] if len(trained) else 0
        if self.attention_mask:  # True = masked; right padding needs no more than causality
            out["attention_mask"] = ~np.tril(np.ones((1, s, s), dtype=bool))
        return out

    def item(self, number: int) -> dict:
        out = self.rows([(e.ids, e.mask) for e in self.pairs[number]])
        out["index"] = np.int64(number)
        return out

    def __getitem__(self, index: int) -> dict:
        return self.item(self.pair_index(index))


def pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod


def build_pair_dataset(cfg: Config, tokenizer: Tokenizer, device: str,
                       num_samples: Optional[int] = None) -> tuple[PairDataset, str]:
    pairs, text = load_pairs(cfg, tokenizer)
    samples = num_samples or cfg.stage.train_iters * cfg.stage.global_batch_size
    return PairDataset(pairs, cfg.data.seq_length, samples, cfg.seed, pad_id(tokenizer),
                       attention_mask=device == "cpu"), text
