"""Documents to Megatron indexed datasets: `python -m llmtrain.data tokenize`.

The main process only cuts the inputs into chunks and writes; worker processes parse JSON, encode
with `encode_batch` (one core each) and send back one flat array of ids per chunk and key. One
dataset per JSON key: `<output_prefix>_<key>_document.bin/.idx`, as Megatron-LM's
tools/preprocess_data.py names them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from llmtrain.config.schema import TokenizerConfig
from llmtrain.data.indexed import IndexedDatasetWriter
from llmtrain.data.sources import (Chunk, DataError, chunks, no_documents, parse_chunk,
                                   text_field)
from llmtrain.data.tokenizer import Tokenizer, load_tokenizer
from llmtrain.data.workers import Progress, ordered_map


def dataset_prefix(output_prefix: str | Path, key: str) -> Path:
    return Path(f"{output_prefix}_{key}_document")


@dataclass
class TokenizeSummary:
    documents: int = 0
    tokens: int = 0
    empty: dict[str, int] = field(default_factory=dict)  # per key
    bad_lines: int = 0
    seconds: float = 0.0
    outputs: list[Path] = field(default_factory=list)


_worker: dict = {}


def _init_worker(cfg: TokenizerConfig, keys: tuple[str, ...], append_eod: bool,
                 special_tokens: bool, skip_bad_lines: bool) -> None:
    _worker.update(tokenizer=load_tokenizer(cfg).single_threaded(), keys=keys,
                   append_eod=append_eod, special_tokens=special_tokens,
                   skip_bad_lines=skip_bad_lines)


def flatten(ids: list[list[int]], dtype, eod: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids end to end (each followed by `eod` if given), and their lengths."""
    if eod is not None:
        ids = [doc + [eod] for doc in ids]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _tokenize_chunk(chunk: Chunk):
    tokenizer: Tokenizer = _worker["tokenizer"]
    parsed = parse_chunk(chunk, _worker["skip_bad_lines"])
    eod = tokenizer.eod if _worker["append_eod"] else None
    out = {}
    for key in _worker["keys"]:
        texts = [text_field(record, key, where) for where, record in parsed.records]
        kept = [t for t in texts if t.strip()]
        flat, lengths = flatten(tokenizer.encode_batch(kept, _worker["special_tokens"]),
                                np.int32, eod)
        out[key] = (flat, lengths, len(texts) - len(kept))
    return out, len(parsed.records), parsed.bad_lines


def tokenize_files(inputs: Sequence[str | Path], output_prefix: str | Path,
                   tokenizer_cfg: TokenizerConfig, json_keys: Sequence[str] = ("text",),
                   append_eod: bool = True, workers: int = 1, skip_bad_lines: bool = False,
                   progress: bool = True, log_interval: Optional[float] = None,
                   special_tokens: bool = True) -> TokenizeSummary:
    """Tokenize every document of `inputs` into one indexed dataset per key. As Megatron-LM's
    tools/preprocess_data.py: `special_tokens` adds the tokenizer's template tokens to every
    document (its default; off is its --tokenizer-hf-no-include-special-tokens), then
    `append_eod` the end-of-document token."""
    tokenizer = load_tokenizer(tokenizer_cfg)
    if append_eod:
        tokenizer.eod  # refused here, before anything is read, when the tokenizer has none
    keys = tuple(json_keys)
    summary = TokenizeSummary(empty={key: 0 for key in keys})
    writers = {key: IndexedDatasetWriter(dataset_prefix(output_prefix, key), tokenizer.vocab_size)
               for key in keys}
    meter = Progress("tokenize", enabled=progress, interval=log_interval)
    try:
        results = ordered_map(_tokenize_chunk, chunks(inputs, columns=keys), workers,
                              _init_worker, (tokenizer_cfg, keys, append_eod, special_tokens,
                                             skip_bad_lines))
        for out, documents, bad in results:
            tokens = 0
            for key, (flat, lengths, empty) in out.items():
                try:
                    writers[key].add_documents(flat, lengths)
                except ValueError as error:
                    raise DataError(f"{error}; the tokenizer reports {tokenizer.vocab_size} "
                                    f"tokens") from None
                summary.empty[key] += empty
                tokens += flat.size
            summary.documents += documents
            summary.tokens += tokens
            summary.bad_lines += bad
            meter.update(documents, tokens)
        for key, writer in writers.items():
            if not writer.sequence_lengths:
                raise no_documents(f"to write for key {key!r}", inputs, summary.documents,
                                   summary.bad_lines, f" ({summary.empty[key]} empty)")
        summary.outputs = [writer.close() for writer in writers.values()]
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        meter.close()
    summary.seconds = meter.seconds
    return summary
