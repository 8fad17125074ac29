"""Run lengths given in tokens, turned into iterations (what Megatron's scheduler counts).

Users of Pai-Megatron-Patch give TRAIN_TOKENS and WARMUP_TOKENS; one step consumes
global_batch_size x seq_length tokens. A token count, when set, decides its iteration field.
"""

from __future__ import annotations

import dataclasses
import math

from llmtrain.config.schema import Config

TOKEN_FIELDS = (("stage", "train_tokens", "train_iters"),
                ("optim", "lr_warmup_tokens", "lr_warmup_iters"),
                ("optim", "lr_decay_tokens", "lr_decay_iters"),
                ("optim", "lr_wsd_decay_tokens", "lr_wsd_decay_iters"))


def tokens_per_step(cfg: Config) -> int:
    return cfg.stage.global_batch_size * cfg.data.seq_length


def resolve_token_lengths(cfg: Config) -> Config:
    """A copy of `cfg` whose *_iters fields hold the iteration counts of any *_tokens fields."""
    per_step = max(tokens_per_step(cfg), 1)
    for group, tokens_field, iters_field in TOKEN_FIELDS:
        section = getattr(cfg, group)
        tokens = getattr(section, tokens_field)
        if tokens is not None:
            section = dataclasses.replace(section, **{iters_field: math.ceil(tokens / per_step)})
            cfg = dataclasses.replace(cfg, **{group: section})
    return cfg
