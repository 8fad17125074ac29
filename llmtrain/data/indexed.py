"""Megatron's indexed dataset format (`<prefix>.bin` tokens + `<prefix>.idx` index), written here.

The writer needs neither torch nor Megatron, so tokenizer workers stay light; the files are read
unchanged by `megatron.core.datasets.indexed_dataset.IndexedDataset`. Writes are atomic: both
files are written under temporary names and renamed at the end, the index last, so an interrupted
run never leaves a pair that looks complete.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype Megatron uses for a vocabulary (uint16 below 65500 ids)."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexedDatasetWriter:
    """Append documents (lists of token ids), then `close()` to publish the pair."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self._bin_tmp = Path(f"{self.prefix}.bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def add_document(self, ids) -> None:
        array = np.asarray(ids, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= self.vocab_size):
            bad = int(array.max()) if array.max() >= self.vocab_size else int(array.min())
            raise ValueError(f"token id {bad} is outside the vocabulary of size "
                             f"{self.vocab_size}: the tokenizer and vocab_size disagree")
        self._bin.write(array.astype(self.dtype).tobytes(order="C"))
        self.sequence_lengths.append(int(array.size))
        self.document_indices.append(len(self.sequence_lengths))

    def close(self) -> Path:
        self._bin.close()
        lengths = np.asarray(self.sequence_lengths, dtype=np.int32)
        itemsize = np.dtype(self.dtype).itemsize
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * itemsize, out=pointers[1:])
        idx_tmp = Path(f"{self.prefix}.idx.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self.document_indices)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.asarray(self.document_indices, dtype=np.int64).tobytes(order="C"))
        os.replace(self._bin_tmp, f"{self.prefix}.bin")
        os.replace(idx_tmp, f"{self.prefix}.idx")
        return self.prefix

    def abort(self) -> None:
        """Drop what was written; nothing is published."""
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
