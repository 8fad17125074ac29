"""Merge inputs and split them into shards of N documents: `python -m llmtrain.data shard`.

Shards are `<name>_00000.jsonl.zst`, ... (zstandard, multi-threaded). JSON lines pass through
byte for byte after being checked; records of JSON arrays and parquet files are written as JSON
lines. Each shard appears under its final name only once it is complete.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from llmtrain.data.sources import atomic_output, chunks, no_documents, parse_chunk
from llmtrain.data.workers import Progress


@dataclass
class ShardSummary:
    documents: int = 0
    bad_lines: int = 0
    shards: list[Path] = field(default_factory=list)


def _lines(chunk, skip_bad_lines: bool) -> tuple[list[bytes], int]:
    """Checked JSON lines of a chunk (newline-terminated) and how many were malformed."""
    parsed = parse_chunk(chunk, skip_bad_lines)
    if parsed.raw is not None:
        return [line.rstrip(b"\r") + b"\n" for line in parsed.raw], parsed.bad_lines
    return [(json.dumps(record, ensure_ascii=False) + "\n").encode()
            for _, record in parsed.records], parsed.bad_lines


def shard_files(inputs: Sequence[str | Path], output_dir: str | Path, docs_per_shard: int,
                name: str = "shard", skip_bad_lines: bool = False, progress: bool = True,
                log_interval: Optional[float] = None) -> ShardSummary:
    if docs_per_shard < 1:
        raise ValueError(f"--docs-per-shard={docs_per_shard} must be at least 1")
    summary = ShardSummary()
    output_dir = Path(output_dir)
    meter = Progress("shard", enabled=progress, interval=log_interval, unit="B")
    try:
        with ExitStack() as stack:
            out, in_shard = None, 0
            for chunk in chunks(inputs):
                lines, bad = _lines(chunk, skip_bad_lines)
                summary.bad_lines += bad
                for line in lines:
                    if out is None or in_shard == docs_per_shard:
                        stack.close()
                        path = output_dir / f"{name}_{len(summary.shards):05d}.jsonl.zst"
                        out = stack.enter_context(atomic_output(path))
                        summary.shards.append(path)
                        in_shard = 0
                    out.write(line)
                    in_shard += 1
                    summary.documents += 1
                meter.update(len(lines), sum(map(len, lines)))
    finally:
        meter.close()
    if not summary.documents:
        raise no_documents("to shard", inputs, 0, summary.bad_lines)
    return summary
