"""Raw documents to clean jsonl: `python -m llmtrain.data clean`.

Each document's text (one or several keys joined by a newline, e.g. WuDao's title and content)
is normalised (unicode form, control and zero-width characters, spaces, blank lines), then the
document is dropped if it is empty, too short, mostly not letters (tables, markup, encoded
data; letters of every script count) or an exact duplicate of an earlier one (hash of the
cleaned text). Workers clean; the main process removes duplicates in input order and writes,
so the output is the same for any number of workers.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from llmtrain.data.sources import (Chunk, DataError, atomic_output, chunks, no_documents,
                                   parse_chunk, text_field)
from llmtrain.data.workers import Progress, ordered_map

DROP_REASONS = ("empty", "too_short", "non_text", "duplicate")
# Control characters (tab and newline excepted), zero-width characters and the BOM.
_INVISIBLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")
_SPACES = re.compile(r"[^\S\n]+")  # any whitespace but newlines, unicode spaces included
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class CleanOptions:
    text_keys: tuple[str, ...] = ("text",)
    keep_keys: tuple[str, ...] = ()
    output_key: str = "text"
    min_chars: int = 32
    # Share of the non-space characters that must be letters (any script).
    min_letter_ratio: float = 0.5
    unicode_form: Optional[str] = "NFC"  # NFC | NFKC | None
    dedup: bool = True
    skip_bad_lines: bool = False


@dataclass
class CleanSummary:
    read: int = 0
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    bad_lines: int = 0
    seconds: float = 0.0


def normalize(text: str, form: Optional[str] = "NFC") -> str:
    """Unicode form, line ends, invisible characters, runs of spaces, trailing spaces per line,
    more than one blank line, and leading and trailing whitespace."""
    if form:
        text = unicodedata.normalize(form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _INVISIBLE.sub("", text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_LINES.sub("\n\n", text).strip()


def letter_ratio(text: str) -> float:
    """Letters (of any script) among the characters that are not whitespace."""
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return 0.0
    return sum(c.isalpha() for c in visible) / len(visible)


def clean_record(record: dict, where: str, options: CleanOptions
                 ) -> tuple[Optional[str], Optional[dict]]:
    """(drop reason, None) or (None, the cleaned record)."""
    parts = [text_field(record, key, where, "choose keys with --text-keys")
             for key in options.text_keys]
    text = normalize("\n".join(p for p in parts if p), options.unicode_form)
    if not text:
        return "empty", None
    if len(text) < options.min_chars:
        return "too_short", None
    if letter_ratio(text) < options.min_letter_ratio:
        return "non_text", None
    out = {}
    for key in options.keep_keys:
        if key not in record:
            present = ", ".join(map(repr, record))
            raise DataError(f"{where}: no key {key!r}; the keys present are: {present} "
                            f"(choose keys with --keep-keys)")
        out[key] = record[key]
    out[options.output_key] = text
    return None, out


_options: dict = {}


def _init_worker(options: CleanOptions) -> None:
    _options["options"] = options


def _clean_chunk(chunk: Chunk):
    options: CleanOptions = _options["options"]
    parsed = parse_chunk(chunk, options.skip_bad_lines)
    results = []
    for where, record in parsed.records:
        reason, cleaned = clean_record(record, where, options)
        if reason:
            results.append((reason, None, None))
        else:
            text = cleaned[options.output_key]
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            line = json.dumps(cleaned, ensure_ascii=False) + "\n"
            results.append((None, line.encode("utf-8"), digest))
    return results, parsed.bad_lines


def clean_files(inputs: Sequence[str | Path], output: str | Path, options: CleanOptions,
                workers: int = 1, progress: bool = True,
                log_interval: Optional[float] = None) -> CleanSummary:
    """Clean every document of `inputs` into one jsonl (or .jsonl.zst) file, atomically."""
    summary = CleanSummary()
    seen: set[bytes] = set()
    meter = Progress("clean", enabled=progress, interval=log_interval, unit="B")  # B written
    columns = options.text_keys + options.keep_keys
    try:
        with atomic_output(output) as out:
            for results, bad in ordered_map(_clean_chunk, chunks(inputs, columns=columns),
                                            workers, _init_worker, (options,)):
                summary.bad_lines += bad
                written = 0
                for reason, line, digest in results:
                    summary.read += 1
                    if reason is None and options.dedup:
                        if digest in seen:
                            reason = "duplicate"
                        else:
                            seen.add(digest)
                    if reason:
                        summary.dropped[reason] += 1
                    else:
                        summary.kept += 1
                        out.write(line)
                        written += len(line)
                meter.update(len(results), written)
            if not summary.kept:
                dropped = ", ".join(f"{n} {reason.replace('_', ' ')}"
                                    for reason, n in summary.dropped.items() if n)
                raise no_documents("kept", inputs, summary.read, summary.bad_lines,
                                   f" ({dropped or 'none'} dropped)")
    finally:
        meter.close()
    summary.seconds = meter.seconds
    return summary
