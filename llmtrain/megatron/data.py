"""Training and validation batches from Megatron-Core's GPT datasets.

Every rank reads the samples it needs itself (the files are memory-mapped), so nothing is
broadcast. Samples of global step k are k*G .. (k+1)*G-1 (G = global batch) whatever the data
parallel size, so layouts see the same data and a resumed run continues token-exactly from
`consumed_samples`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from llmtrain.config.schema import Config
from llmtrain.config.validate import Layout
from llmtrain.data.tokenizer import Tokenizer


@dataclass
class TokenIds:
    """What Megatron's datasets ask of a tokenizer."""

    vocab_size: int
    eod: int
    pad: int = -1
    unique_identifiers: Optional[dict] = None


def data_prefixes(cfg: Config) -> list[str]:
    if cfg.data.kind == "corpus":
        from llmtrain.data.corpus import corpus_prefix

        return [str(corpus_prefix())]
    return [str(p) for p in cfg.data.data_path]


def build_datasets(cfg: Config, layout: Layout, tokenizer: Tokenizer, cache_dir: str):
    """Train and validation GPTDatasets sized for the whole run (the validation set may be None).

    On CPU the causal mask comes with each sample (Megatron builds its default mask on CUDA);
    GPU attention kernels make their own."""
    stage = cfg.stage
    train_samples = stage.train_iters * stage.global_batch_size
    evals = stage.train_iters // stage.eval_interval + 1 if stage.eval_interval else 0
    valid_samples = evals * stage.eval_iters * stage.global_batch_size
    mock = cfg.data.kind == "mock"
    config = GPTDatasetConfig(
        random_seed=cfg.seed,
        sequence_length=cfg.data.seq_length,
        blend=None if mock else get_blend_from_list(data_prefixes(cfg)),
        split=cfg.data.split,
        path_to_cache=cache_dir,
        tokenizer=TokenIds(tokenizer.vocab_size, tokenizer.eod, tokenizer.pad),
        reset_position_ids=cfg.data.reset_position_ids,
        reset_attention_mask=cfg.data.reset_attention_mask,
        eod_mask_loss=cfg.data.eod_mask_loss,
        create_attention_mask=layout.device == "cpu",
        mid_level_dataset_surplus=0.005,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MockGPTDataset if mock else GPTDataset,
        [train_samples, valid_samples, 0],
        lambda: True,
        config,
    ).build()
    return train, valid


class StepSampler(torch.utils.data.Sampler):
    """Micro-batches of sample indices for one data-parallel rank, from a given step on."""

    def __init__(self, num_samples: int, start_sample: int, micro_batch_size: int,
                 global_batch_size: int, dp_rank: int, dp_size: int):
        self.num_samples = num_samples
        self.start_sample = start_sample
        self.micro = micro_batch_size
        self.glob = global_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank

    def __iter__(self) -> Iterator[list[int]]:
        step_start = self.start_sample
        while step_start + self.glob <= self.num_samples:
            rank_start = step_start + self.dp_rank * self.per_rank
            for offset in range(0, self.per_rank, self.micro):
                yield list(range(rank_start + offset, rank_start + offset + self.micro))
            step_start += self.glob

    def __len__(self) -> int:
        return (self.num_samples - self.start_sample) // self.glob * (self.per_rank // self.micro)


def batches(dataset, cfg: Config, layout: Layout, dp_rank: int, start_sample: int = 0):
    """An endless-enough iterator of micro-batches (dicts of tensors) for this rank."""
    if dataset is None:
        return None
    sampler = StepSampler(len(dataset), start_sample, cfg.stage.micro_batch_size,
                          cfg.stage.global_batch_size, dp_rank, layout.data_parallel_size)
    workers = cfg.data.num_workers
    if workers is None:
        workers = 2 if layout.device == "cuda" else 0
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers,
        pin_memory=layout.device == "cuda", persistent_workers=workers > 0)
    return iter(loader)
