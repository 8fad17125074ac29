"""Datasets in the Hugging Face formats, read as rows like a parquet file: a folder written by
`datasets.save_to_disk` (one dataset, or a DatasetDict of splits), or a folder of parquet or
arrow shards (its training split's, where the file names say the split, as in a dataset from the
Hub: llmtrain.data.hub). The rows go through the same column checks and record parsing as the
files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

from llmtrain.data.sources import Chunk, DataError

SPLIT = "train"  # the split read from a DatasetDict and from a folder of shards
SHARD_FORMATS = (("parquet", ".parquet"), ("arrow", ".arrow"))
WHAT = ("a folder written by datasets.save_to_disk, or a folder of .parquet or .arrow shards")


def _load(folder: Path):
    import datasets

    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        loaded = datasets.load_from_disk(str(folder))
        if isinstance(loaded, datasets.DatasetDict):
            if SPLIT not in loaded:
                raise DataError(f"{folder}: a DatasetDict without a {SPLIT!r} split (its splits: "
                                f"{', '.join(loaded)}): save the training rows as {SPLIT!r}, or "
                                f"give the split's folder, {folder}/<split>")
            return loaded[SPLIT]
        return loaded
    for builder, suffix in SHARD_FORMATS:
        shards = _training_shards(folder, sorted(folder.rglob(f"*{suffix}")))
        if shards:
            return datasets.load_dataset(builder, data_files={SPLIT: shards}, split=SPLIT)
    raise DataError(f"{folder}: a folder, but not a dataset: give a file, or {WHAT}")


def _training_shards(folder: Path, shards: list[Path]) -> list[str]:
    """The shards of the training split where the folder names splits as the Hub lays them out
    (data/train-00000-of-00002.parquet, or train/0000.parquet), else every shard."""
    def in_train(path: Path) -> bool:
        parts = path.relative_to(folder).parts
        return any(p == SPLIT or p.startswith((f"{SPLIT}-", f"{SPLIT}.")) for p in parts)

    train = [p for p in shards if in_train(p)]
    return [str(p) for p in train or shards]


def hf_chunks(folder: str, records_per_chunk: int,
              columns: Optional[Sequence[str]]) -> Iterator[Chunk]:
    """Chunks of rows of the dataset in `folder`; a missing column is reported before any row
    is read, with the columns present."""
    dataset = _load(Path(folder))
    for key in columns or ():
        if key not in dataset.column_names:
            raise DataError(f"{folder}: no column {key!r}; the columns present are: "
                            f"{', '.join(dataset.column_names)}")
    if columns:
        dataset = dataset.select_columns(list(columns))
    for start in range(0, len(dataset), records_per_chunk):
        rows = dataset[start:start + records_per_chunk]  # columns -> lists
        records = [dict(zip(rows, values)) for values in zip(*rows.values())]
        yield Chunk(folder, start + 1, "row", records=records)


def folder_fingerprint(folder: str | os.PathLike) -> str:
    """What identifies a dataset folder's content cheaply: every file's name, size and mtime."""
    parts = []
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            stat = path.stat()
            parts += [str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()
