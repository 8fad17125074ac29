"""Training and validation batches from Megatron-Core's GPT datasets, or from SFT datasets.

Every rank reads the samples it needs itself (the files are memory-mapped), so nothing is
broadcast. Samples of global step k are k*G .. (k+1)*G-1 (G = global batch) whatever the data
parallel size, so layouts see the same data and a resumed run continues token-exactly from
`consumed_samples`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list
from megatron.core.packed_seq_params import PackedSeqParams

from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config
from llmtrain.data.indexed import IndexedDatasetReader
from llmtrain.data.sources import DataError
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


def _max_token_id(prefix: str, cache_dir: str) -> int:
    """The largest token id of a dataset, remembered in the cache (keyed by the .bin's size and
    time) because reading a large .bin takes a while."""
    stat = Path(f"{prefix}.bin").stat()
    key = hashlib.sha256(f"{Path(prefix).resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    memo = Path(cache_dir) / f"max_token_id_{key.hexdigest()[:16]}.json"
    if memo.exists():
        return json.loads(memo.read_text())["max_token_id"]
    value = IndexedDatasetReader(prefix).max_token_id()
    memo.parent.mkdir(parents=True, exist_ok=True)
    # Every rank may compute it at once: write aside and rename, so no rank reads half a file.
    scratch = memo.with_suffix(f".{os.getpid()}.tmp")
    scratch.write_text(json.dumps({"prefix": prefix, "max_token_id": value}))
    os.replace(scratch, memo)
    return value


def check_indexed_data(cfg: Config, prefixes: list[str], sizes: dict[str, int],
                       cache_dir: str) -> None:
    """What Megatron would otherwise fail on obscurely (or loop forever on): a missing dataset,
    a split given no documents, ids beyond the model's vocabulary."""
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(cfg.data.split))
    for prefix in prefixes:
        try:
            reader = IndexedDatasetReader(prefix)
        except FileNotFoundError as error:
            raise DataError(f"{error}: data.data_path lists prefixes written by `python -m "
                            f"llmtrain.data tokenize` (without .bin/.idx)") from None
        documents = len(reader.document_indices) - 1
        for index, (name, samples) in enumerate(sizes.items()):
            bounds = matrix[index]
            count = 0 if bounds is None else (int(round(bounds[1] * documents))
                                              - int(round(bounds[0] * documents)))
            if samples and count == 0:
                hint = " or set stage.eval_interval=0" if name == "valid" else ""
                share = bounds[1] - bounds[0] if bounds else 0.0
                raise DataError(f"the {name} split of {prefix} has no documents: data.split="
                                f"{cfg.data.split} gives it {share:.1%} of {documents} "
                                f"document(s), which rounds to none: add data or raise its share "
                                f"of data.split{hint}")
        if np.iinfo(reader.dtype).max >= cfg.model.vocab_size:  # else no id can be too big
            biggest = _max_token_id(prefix, cache_dir)
            if biggest >= cfg.model.vocab_size:
                raise DataError(f"{prefix} holds token id {biggest}: it needs a vocabulary of at "
                                f"least {biggest + 1} tokens, but model {cfg.model.name} has "
                                f"vocab_size {cfg.model.vocab_size}; tokenize the data with the "
                                f"model's tokenizer, or choose a model with a larger vocabulary")


def build_datasets(cfg: Config, layout: Layout, tokenizer: Tokenizer, cache_dir: str):
    """Train and validation datasets sized for the whole run (the validation set may be None):
    Megatron-Core's GPTDatasets, or SFT datasets for data.kind=sft.

    On CPU the causal mask comes with each sample (Megatron builds its default mask on CUDA);
    GPU attention kernels make their own."""
    stage = cfg.stage
    train_samples = stage.train_iters * stage.global_batch_size
    evals = stage.train_iters // stage.eval_interval + 1 if stage.eval_interval else 0
    valid_samples = evals * stage.eval_iters * stage.global_batch_size
    if cfg.data.kind == "sft":
        from llmtrain.data.sft import build_sft_datasets

        train, valid, description = build_sft_datasets(cfg, tokenizer, cache_dir, train_samples,
                                                        valid_samples, layout.device)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"[llmtrain] {description}", flush=True)
        return train, valid
    mock = cfg.data.kind == "mock"
    if not mock:
        prefixes = get_blend_from_list(data_prefixes(cfg))[0]
        check_indexed_data(cfg, prefixes, {"train": train_samples, "valid": valid_samples},
                           cache_dir)
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
    sizes = [train_samples, valid_samples, 0]
    # Splits nobody reads are not built: Megatron loops forever on a split without documents
    # (a small dataset's test split), even when no sample of it is asked for.
    config.split_matrix = [bounds if size else None
                           for bounds, size in zip(config.split_matrix, sizes)]
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MockGPTDataset if mock else GPTDataset, sizes, lambda: True, config).build()
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


def packed_seq_params(batch: dict, device: str) -> Optional[PackedSeqParams]:
    """Megatron-Core's packed-sequence ("thd") parameters of a packed SFT micro-batch (GPU
    attention kernels take sample borders from them; on CPU the attention mask carries them).
    Packing on the GPU runs with micro_batch_size 1, as Megatron-LM's does."""
    if "cu_seqlens" not in batch:
        return None
    cu_seqlens = batch["cu_seqlens"][0]
    cu_seqlens = cu_seqlens[cu_seqlens >= 0].to(device=device, dtype=torch.int32)
    longest = int(batch["max_seqlen"].max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


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
