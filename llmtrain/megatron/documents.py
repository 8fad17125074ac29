"""Documents of a Megatron indexed dataset (`<prefix>.bin` + `<prefix>.idx`), read by
Megatron-Core's own reader (memory-mapped)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset


def documents(prefix: str) -> Iterator[np.ndarray]:
    """Each document's token ids, in order."""
    missing = [f"{prefix}{s}" for s in (".bin", ".idx") if not Path(f"{prefix}{s}").exists()]
    if missing:
        raise FileNotFoundError(f"the indexed dataset {prefix} lacks {' and '.join(missing)}: "
                                f"give the prefix `python -m llmtrain.data tokenize` wrote "
                                f"(without .bin/.idx)")
    dataset = IndexedDataset(str(prefix), mmap=True)
    for index in range(len(dataset)):
        yield dataset[index]
