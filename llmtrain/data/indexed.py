"""Megatron's indexed dataset format (`<prefix>.bin` tokens + `<prefix>.idx` index), written here.

The writer and reader need neither torch nor Megatron, so tokenizer workers stay light; the files
are read unchanged by `megatron.core.datasets.indexed_dataset.IndexedDataset`. Writes are atomic:
both files are written under temporary names; at the end the old index goes first, then the new
`.bin` and `.idx` are renamed into place, the index last, so an interrupted run never leaves a
pair that looks complete.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path
from typing import Optional

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
               np.float64: 6, np.float32: 7, np.uint16: 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> type:
    """The smallest dtype Megatron uses for a vocabulary (uint16 below 65500 ids)."""
    return np.uint16 if vocab_size < 65500 else np.int32


def exists(prefix: str | os.PathLike) -> bool:
    """Whether a complete pair is published at `prefix`."""
    return Path(f"{prefix}.bin").exists() and Path(f"{prefix}.idx").exists()


def dataset_prefixes(inputs, skip: Optional[str | os.PathLike] = None) -> list[Path]:
    """Dataset prefixes from what a shell passes: prefixes, `.bin` / `.idx` files (`tok/*.bin`,
    `tok/*`), or folders (every pair in them, sorted by name), each once, in order; `skip` (the
    output prefix) is left out of folders."""
    prefixes: list[Path] = []
    for given in map(Path, inputs):
        if given.is_dir():
            found = sorted({p.with_suffix("") for p in given.iterdir()
                            if p.suffix in (".bin", ".idx")})
            found = [p for p in found if skip is None or p != Path(skip)]
            if not found:
                raise FileNotFoundError(f"{given} holds no indexed dataset (.bin/.idx pair): "
                                        f"give the folder written by tokenize, or prefixes")
            for prefix in found:
                if not exists(prefix):
                    raise FileNotFoundError(f"{prefix}: {prefix}.bin or {prefix}.idx is "
                                            f"missing in {given}: tokenize it again, or give "
                                            f"the complete pairs as prefixes")
            prefixes.extend(found)
        else:
            prefixes.append(given.with_suffix("") if given.suffix in (".bin", ".idx") else given)
    return list(dict.fromkeys(prefixes))


class IndexedDatasetWriter:
    """Append documents (lists or arrays of token ids), then `close()` to publish the pair.

    With `vocab_size`, every id is checked to lie in [0, vocab_size); `dtype` overrides the
    token dtype (e.g. uint8 for loss masks)."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: Optional[int] = None,
                 dtype: Optional[type] = None):
        self.prefix = Path(prefix)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self.vocab_size = vocab_size
        if dtype is None and vocab_size is None:
            raise ValueError("IndexedDatasetWriter needs a vocab_size or a dtype")
        self.dtype = dtype or token_dtype(vocab_size)
        self._bin_tmp = Path(f"{self.prefix}.bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]
        self.num_tokens = 0

    def _check(self, array: np.ndarray) -> None:
        if self.vocab_size is None or not array.size:
            return
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= self.vocab_size:
            bad = high if high >= self.vocab_size else low
            raise ValueError(f"token id {bad} is outside the vocabulary of size "
                             f"{self.vocab_size} (ids must lie in 0..{self.vocab_size - 1}): "
                             f"the tokenizer and the vocabulary size disagree")

    def add_document(self, ids) -> None:
        array = np.asarray(ids, dtype=np.int64)
        self._check(array)
        self._bin.write(array.astype(self.dtype).tobytes(order="C"))
        self.sequence_lengths.append(int(array.size))
        self.document_indices.append(len(self.sequence_lengths))
        self.num_tokens += int(array.size)

    def add_documents(self, flat: np.ndarray, lengths) -> None:
        """Many documents at once: their ids end to end in `flat`, one length per document."""
        lengths = [int(n) for n in lengths]
        if sum(lengths) != flat.size:
            raise ValueError(f"{flat.size} ids do not add up to the lengths given "
                             f"({sum(lengths)})")
        self._check(flat)
        self._bin.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes(order="C"))
        first = len(self.sequence_lengths)
        self.sequence_lengths.extend(lengths)
        self.document_indices.extend(range(first + 1, first + len(lengths) + 1))
        self.num_tokens += int(flat.size)

    def add_index(self, prefix: str | os.PathLike) -> None:
        """Append every document of another published dataset (same dtype): merging."""
        other = IndexedDatasetReader(prefix)
        if other.dtype != np.dtype(self.dtype):
            raise ValueError(f"{prefix} holds {other.dtype} tokens but this dataset holds "
                             f"{np.dtype(self.dtype)}: merge datasets made with the same "
                             f"vocabulary size")
        if self.vocab_size is not None and len(other):
            self._check(np.asarray([other.max_token_id()]))
        with open(f"{prefix}.bin", "rb") as source:
            shutil.copyfileobj(source, self._bin, 16 << 20)
        offset = len(self.sequence_lengths)
        self.sequence_lengths.extend(int(n) for n in other.sequence_lengths)
        self.document_indices.extend(int(i) + offset for i in other.document_indices[1:])
        self.num_tokens += int(other.sequence_lengths.sum())

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
        # An old pair at this prefix stops looking complete before its .bin is replaced.
        Path(f"{self.prefix}.idx").unlink(missing_ok=True)
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


class IndexedDatasetReader:
    """Memory-mapped read access to a published pair, without Megatron (for inspection, SFT
    samples and checks). Megatron-Core reads the same files with its own IndexedDataset."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = Path(prefix)
        if not exists(prefix):
            raise FileNotFoundError(f"no indexed dataset at {prefix} (expected {prefix}.bin "
                                    f"and {prefix}.idx)")
        with open(f"{prefix}.idx", "rb") as f:
            header = f.read(len(INDEX_HEADER))
            if header != INDEX_HEADER:
                raise ValueError(f"{prefix}.idx is not a Megatron indexed dataset index")
            struct.unpack("<Q", f.read(8))
            self.dtype = np.dtype(CODE_DTYPES[struct.unpack("<B", f.read(1))[0]])
            count = struct.unpack("<Q", f.read(8))[0]
            doc_count = struct.unpack("<Q", f.read(8))[0]
            offset = f.tell()
        index = np.memmap(f"{prefix}.idx", mode="r", dtype=np.uint8)
        self.sequence_lengths = np.frombuffer(index, np.int32, count, offset)
        offset += self.sequence_lengths.nbytes
        self.sequence_pointers = np.frombuffer(index, np.int64, count, offset)
        offset += self.sequence_pointers.nbytes
        self.document_indices = np.frombuffer(index, np.int64, doc_count, offset)
        size = Path(f"{prefix}.bin").stat().st_size
        self.tokens = (np.memmap(f"{prefix}.bin", mode="r", dtype=self.dtype)
                       if size else np.zeros(0, self.dtype))

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.tokens[start:start + int(self.sequence_lengths[i])]

    def max_token_id(self, chunk: int = 1 << 26) -> int:
        """The largest id stored (-1 when empty), read in chunks to bound memory."""
        best = -1
        for start in range(0, len(self.tokens), chunk):
            best = max(best, int(self.tokens[start:start + chunk].max()))
        return best
