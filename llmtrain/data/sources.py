"""Reading raw corpora: jsonl (optionally .zst), JSON arrays (WuDao), parquet, plain text, and
datasets in the Hugging Face formats (llmtrain/data/hf_datasets.py).

Files are cut into chunks that worker processes parse (`parse_chunk`), so that reading stays
cheap for the main process. Every record keeps where it came from (file and line, or record or
row number), so that bad input is reported precisely: a malformed line stops the run with its
file and line number unless skipping is asked for, and a missing key names the keys present.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

SUPPORTED = ".jsonl, .json (JSON lines or one JSON array), .parquet, .txt (documents separated " \
            "by blank lines), each optionally compressed as .zst (except parquet), and folders " \
            "written by datasets.save_to_disk or holding .parquet or .arrow shards"
SKIP_HINT = "pass --skip-bad-lines to skip such lines and count them"


class DataError(ValueError):
    """Bad input: the message says where it is and what to do."""


@dataclass
class Chunk:
    """A piece of one input file: raw JSON lines, or records already read."""

    path: str
    first: int  # number (1-based) of the first line / record / row
    unit: str  # "line", "record" (of a JSON array) or "row" (of a parquet file)
    lines: Optional[bytes] = None
    records: Optional[list] = None
    # Line of each record when records do not follow one per line (text paragraphs).
    numbers: Optional[list[int]] = None

    def where(self, offset: int) -> str:
        number = self.numbers[offset] if self.numbers else self.first + offset
        return f"{self.path} {self.unit} {number}"


@dataclass
class Parsed:
    """The records of a chunk with where each came from, and how many lines were malformed."""

    records: list[tuple[str, dict]]
    bad_lines: int = 0
    # The bytes of each record's line (JSON lines only), to pass lines through unchanged.
    raw: Optional[list[bytes]] = None


def input_format(path: str | os.PathLike) -> str:
    """jsonl, json, parquet or txt, from the file name (a .json file may hold JSON lines)."""
    name = Path(path).name.lower().removesuffix(".zst")
    for suffix, kind in ((".jsonl", "jsonl"), (".json", "json"), (".parquet", "parquet"),
                         (".txt", "txt"), (".text", "txt")):
        if name.endswith(suffix):
            if kind == "parquet" and str(path).endswith(".zst"):
                break
            return kind
    raise DataError(f"{path}: unknown input format; supported are {SUPPORTED}")


class _ZstdFrames(io.RawIOBase):
    """The frames of a .zst file, one after the other, decompressed. A file that ends inside a
    frame is reported as truncated: zstandard's stream reader returns what it got and stops
    without a word, and the cut line would then read as malformed JSON."""

    def __init__(self, path: str | os.PathLike):
        import zstandard

        self._zstd = zstandard
        self.path = path
        self._raw = open(path, "rb")
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._inside = False  # part of a frame was read, not its end
        self._out = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._out:
            data = self._raw.read(1 << 20)
            if not data:
                if self._inside:
                    raise DataError(f"{self.path}: truncated zstd file (zstd frame error: the "
                                    f"file ends inside a frame): it was cut short, as by an "
                                    f"interrupted copy or download; copy or compress it again")
                return 0
            self._out = memoryview(self._decompress(data))
        size = min(len(buffer), len(self._out))
        buffer[:size] = self._out[:size]
        self._out = self._out[size:]
        return size

    def _decompress(self, data: bytes) -> bytes:
        parts = []
        while data:
            try:
                parts.append(self._frame.decompress(data))
            except self._zstd.ZstdError as error:
                raise DataError(f"{self.path}: damaged zstd file (zstd error: {error}): copy "
                                f"or compress it again") from None
            self._inside = not self._frame.eof
            if self._inside:
                break
            data = self._frame.unused_data  # the next frame
            self._frame = self._zstd.ZstdDecompressor().decompressobj()
        return b"".join(parts)

    def close(self) -> None:
        self._raw.close()
        super().close()


def _open_binary(path: str | os.PathLike) -> IO[bytes]:
    if str(path).endswith(".zst"):
        return io.BufferedReader(_ZstdFrames(path), 1 << 20)
    return open(path, "rb")


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        part = stream.read(size - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _line_chunks(path: str, chunk_bytes: int) -> Iterator[Chunk]:
    line = 1
    rest = b""
    with _open_binary(path) as stream:
        while True:
            block = _read_exactly(stream, chunk_bytes)
            data = rest + block
            if not block:
                if data:
                    yield Chunk(path, line, "line", lines=data)
                return
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            piece, rest = data[:cut], data[cut:]
            yield Chunk(path, line, "line", lines=piece)
            line += piece.count(b"\n")


def _first_char(path: str) -> bytes:
    with _open_binary(path) as stream:
        head = stream.read(4096).lstrip()
    return head[:1]


def _json_reason(error: ValueError) -> str:
    if not isinstance(error, json.JSONDecodeError):
        return str(error)
    at = "" if error.msg.endswith(" at") else " at"  # "Unterminated string starting at"
    return f"{error.msg}{at} column {error.colno}"


def _load_json_array(path: str) -> list:
    with _open_binary(path) as stream:
        text = stream.read().decode("utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path} line {error.lineno}: malformed JSON ({_json_reason(error)}): "
                        f"fix the file") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: holds one JSON {type(data).__name__}, not an array of "
                        f"documents or one document per line: write one JSON object per "
                        f"line (JSON lines) or an array of objects")
    return data


def _text_chunks(path: str, records_per_chunk: int) -> Iterator[Chunk]:
    """Plain text: documents are separated by blank lines; each starts at its first line."""
    with _open_binary(path) as stream:
        lines = io.TextIOWrapper(stream, encoding="utf-8")
        records, numbers, paragraph = [], [], []
        for number, line in enumerate(lines, 1):
            if line.strip():
                if not paragraph:
                    numbers.append(number)
                paragraph.append(line.rstrip("\n"))
                continue
            if paragraph:
                records.append({"text": "\n".join(paragraph)})
                paragraph = []
            if len(records) >= records_per_chunk:
                yield Chunk(path, numbers[0], "line", records=records, numbers=numbers)
                records, numbers = [], []
        if paragraph:
            records.append({"text": "\n".join(paragraph)})
        if records:
            yield Chunk(path, numbers[0], "line", records=records, numbers=numbers)


def _parquet_chunks(path: str, records_per_chunk: int,
                    columns: Optional[Sequence[str]]) -> Iterator[Chunk]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    present = table.schema_arrow.names
    for key in columns or ():
        if key not in present:
            raise DataError(f"{path}: no column {key!r}; the columns present are: "
                            f"{', '.join(present)}")
    row = 1
    for batch in table.iter_batches(batch_size=records_per_chunk,
                                    columns=list(columns) if columns else None):
        records = batch.to_pylist()
        yield Chunk(path, row, "row", records=records)
        row += len(records)


def chunks(paths: Sequence[str | os.PathLike], chunk_bytes: int = 1 << 22,
           records_per_chunk: int = 2048,
           columns: Optional[Sequence[str]] = None) -> Iterator[Chunk]:
    """Chunks of every input file, in order. `columns`: the keys needed (parquet reads only
    those, and a missing one is reported before anything is read)."""
    for path in map(str, paths):
        if Path(path).is_dir():
            from llmtrain.data.hf_datasets import hf_chunks

            yield from hf_chunks(path, records_per_chunk, columns)
            continue
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file: check the path")
        kind = input_format(path)
        if kind == "parquet":
            yield from _parquet_chunks(path, records_per_chunk, columns)
        elif kind == "txt":
            yield from _text_chunks(path, records_per_chunk)
        elif kind == "json" and _first_char(path) == b"[":
            data = _load_json_array(path)
            for start in range(0, len(data), records_per_chunk):
                yield Chunk(path, start + 1, "record",
                            records=data[start:start + records_per_chunk])
        else:
            yield from _line_chunks(path, chunk_bytes)


def parse_chunk(chunk: Chunk, skip_bad_lines: bool) -> Parsed:
    """The records of a chunk (blank lines are not records). A malformed line raises DataError
    naming the file and line, or is counted when `skip_bad_lines`."""
    if chunk.records is not None:
        parsed = Parsed([])
        for offset, record in enumerate(chunk.records):
            if isinstance(record, dict):
                parsed.records.append((chunk.where(offset), record))
            elif skip_bad_lines:
                parsed.bad_lines += 1
            else:
                raise DataError(f"{chunk.where(offset)}: holds a JSON "
                                f"{type(record).__name__}, not an object with keys; "
                                f"{SKIP_HINT}")
        return parsed
    parsed = Parsed([], raw=[])
    for offset, line in enumerate(chunk.lines.split(b"\n")):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object with keys")
        except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if skip_bad_lines:
                parsed.bad_lines += 1
                continue
            reason = _json_reason(error)
            raise DataError(f"{chunk.where(offset)}: malformed JSON ({reason}): fix the line, "
                            f"or {SKIP_HINT}") from None
        parsed.records.append((chunk.where(offset), record))
        parsed.raw.append(line)
    return parsed


def text_field(record: dict, key: str, where: str, hint: str = "choose keys with --json-keys"
               ) -> str:
    """The text under `key`; a missing key names the keys present."""
    if key not in record:
        present = ", ".join(map(repr, record)) or "none"
        raise DataError(f"{where}: no key {key!r}; the keys present are: {present} ({hint})")
    value = record[key]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: key {key!r} holds a {type(value).__name__}, not text")
    return value


def check_writable(folder: str | os.PathLike, option: str) -> None:
    """Refuse, before any input is read, an output folder that cannot be written (read-only,
    no permission, under a file): a probe file is made and removed, which also catches
    read-only file systems, where permission bits say nothing."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".llmtrain-probe-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise DataError(f"{option}: cannot write to {folder} ({reason}): choose a folder you "
                        f"can write to, or make this one writable") from None


def no_documents(what: str, inputs: Sequence, read: int, bad_lines: int, detail: str = ""
                 ) -> DataError:
    """The error of a run that would publish nothing: an empty input, all of it filtered."""
    files = ", ".join(map(str, inputs))
    return DataError(f"no documents {what}: {read} record(s) read from {files}{detail}, "
                     f"{bad_lines} malformed line(s) skipped; nothing was written: check the "
                     f"input files and the options")


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file written under a temporary name and renamed into place only when the block
    ends without error; `.zst` names are compressed with zstandard."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    raw = open(tmp, "wb")
    try:
        if path.name.endswith(".zst"):
            import zstandard

            with zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(
                    raw, closefd=False) as stream:
                yield stream
        else:
            yield raw
        raw.close()
        os.replace(tmp, path)
    except BaseException:
        raw.close()
        tmp.unlink(missing_ok=True)
        raise
