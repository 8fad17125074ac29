"""The data command as a user runs it: clean, shard, tokenize, merge, inspect, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import ROOT, run_llmtrain
from data_helpers import documents, train_bpe, train_sentencepiece, write_jsonl


def data_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_llmtrain(*args, module="llmtrain.data", check=check, timeout=300)


def read_zst_lines(path) -> list[dict]:
    with open(path, "rb") as f:
        text = zstandard.ZstdDecompressor().stream_reader(f).read().decode()
    return [json.loads(line) for line in text.splitlines()]


def megatron_documents(prefix) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizers")
    train_bpe(directory)
    train_sentencepiece(directory)
    return directory


def test_clean_normalises_filters_and_deduplicates(tmp_path):
    records = [
        {"id": 1, "title": "Ｔｉｔｌｅ", "content": "First\u200b document,   with  spaces \r\n\n\n\nand "
                                                    "a long enough body of text."},
        {"id": 2, "title": "", "content": "   "},
        {"id": 3, "title": "t", "content": "tiny"},
        {"id": 4, "title": "table", "content": "| 1 | 2 | 3 | 4 | 5 | 6 | 7 | 8 | 9 | 10 | 11 |"},
        {"id": 5, "title": "Ｔｉｔｌｅ", "content": "First document, with spaces\n\nand a long "
                                                    "enough body of text."},
        {"id": 6, "title": "中文", "content": "这是一个足够长的中文文档，用来检查其他文字的字母也算作文本。"},
    ]
    source = tmp_path / "wudao.json"
    source.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    out = data_cmd("clean", "--input", str(source), "--output", str(tmp_path / "clean.jsonl.zst"),
                   "--text-keys", "title,content", "--keep-keys", "id", "--unicode", "NFKC",
                   "--workers", "2").stdout
    assert ("read 6 documents, kept 2, dropped 1 empty, 1 too short, 1 non text, 1 duplicate"
            in out)
    kept = read_zst_lines(tmp_path / "clean.jsonl.zst")
    assert kept == [
        {"id": 1, "text": "Title\nFirst document, with spaces\n\nand a long enough body of text."},
        # NFKC folds full-width forms: the full-width comma becomes ","
        {"id": 6, "text": "中文\n这是一个足够长的中文文档,用来检查其他文字的字母也算作文本。"}]


def test_clean_output_does_not_depend_on_workers(tmp_path):
    docs = documents(300) + documents(50)  # duplicates across chunks
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    outputs = []
    for workers in (1, 2):
        target = tmp_path / f"clean{workers}.jsonl"
        data_cmd("clean", "--input", str(source), "--output", str(target), "--min-chars", "10",
                 "--workers", str(workers))
        outputs.append(target.read_bytes())
    assert outputs[0] == outputs[1]
    assert len(outputs[0].splitlines()) == 300


def test_shard_splits_into_compressed_shards(tmp_path):
    docs = [{"text": d} for d in documents(25)]
    first = write_jsonl(tmp_path / "a.jsonl", docs[:10])
    second = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(docs[10:]), second)
    out = data_cmd("shard", "--input", str(first), str(second), "--output-dir",
                   str(tmp_path / "shards"), "--docs-per-shard", "10", "--name", "web").stdout
    assert "25 documents in 3 shard(s)" in out
    shards = sorted((tmp_path / "shards").iterdir())
    assert [p.name for p in shards] == ["web_00000.jsonl.zst", "web_00001.jsonl.zst",
                                        "web_00002.jsonl.zst"]
    assert [r for p in shards for r in read_zst_lines(p)] == docs


@pytest.mark.parametrize("kind", ["huggingface", "gpt2bpe", "sentencepiece", "llama2"])
def test_tokenize_round_trips_through_megatron(tmp_path, tokenizers_dir, kind):
    """Each tokenizer type writes the documents Megatron-LM's preprocess_data.py writes with it
    (--append-eod): its SentencePieceTokenizer adds no BOS, its Llama2Tokenizer opens every
    document with one."""
    docs = documents(120)
    jsonl = write_jsonl(tmp_path / "docs.jsonl", [{"text": d, "title": d[:12]} for d in docs])
    if kind == "huggingface":
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(tokenizers_dir / "tokenizer.json"))
        expected = [backend.encode(d, add_special_tokens=False).ids for d in docs]
        eod = backend.token_to_id("<|endoftext|>")
        args = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                str(tokenizers_dir / "tokenizer.json")]
    elif kind == "gpt2bpe":
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(str(tokenizers_dir / "tokenizer.json"))
        expected = [backend.encode(d, add_special_tokens=False).ids for d in docs]
        eod = backend.token_to_id("<|endoftext|>")
        args = ["--vocab-file", str(tokenizers_dir / "vocab.json"), "--merge-file",
                str(tokenizers_dir / "merges.txt")]
    else:
        import sentencepiece

        backend = sentencepiece.SentencePieceProcessor(model_file=str(tokenizers_dir / "spm.model"))
        bos = [backend.bos_id()] if kind == "llama2" else []
        expected = [bos + backend.encode(d) for d in docs]
        eod = backend.eos_id()
        args = ["--tokenizer-model", str(tokenizers_dir / "spm.model")]
        if kind == "llama2":
            args += ["--tokenizer-type", "Llama2Tokenizer"]
    binaries = []
    for workers in ("1", "2"):
        prefix = tmp_path / f"w{workers}" / "corpus"
        out = data_cmd("tokenize", "--input", str(jsonl), "--output-prefix", str(prefix),
                       "--json-keys", "text", "title", "--append-eod", "--workers", workers,
                       *args).stdout
        assert f"tokenizer {kind.replace('llama2', 'sentencepiece')}" in out
        assert "120 documents" in out
        assert megatron_documents(f"{prefix}_text_document") == [e + [eod] for e in expected]
        assert len(megatron_documents(f"{prefix}_title_document")) == 120
        binaries.append([(tmp_path / f"w{workers}" / f"corpus_text_document.{ext}").read_bytes()
                         for ext in ("bin", "idx")])
    assert binaries[0] == binaries[1]  # the same bytes whatever the number of workers


def test_tokenize_reads_zst_and_parquet_with_extra_vocab(tmp_path, tokenizers_dir):
    docs = documents(40)
    zst = tmp_path / "a.jsonl.zst"
    with open(zst, "wb") as f, zstandard.ZstdCompressor().stream_writer(f) as writer:
        writer.write("".join(json.dumps({"text": d}) + "\n" for d in docs[:20]).encode())
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": d, "n": i} for i, d in enumerate(docs[20:])]),
                   parquet)
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizers_dir / "tokenizer.json"))
    base = backend.get_vocab_size()
    out = data_cmd("tokenize", "--input", str(zst), str(parquet), "--output-prefix",
                   str(tmp_path / "mix"), "--tokenizer-model", str(tokenizers_dir / "tokenizer.json"),
                   "--no-append-eod", "--extra-vocab-size", "70000",
                   "--make-vocab-size-divisible-by", "64", "--tensor-model-parallel-size", "2",
                   "--workers", "2").stdout
    total = base + 70000
    padded = -(-total // 128) * 128
    assert f"{total} tokens (+70000 extra), padded to {padded} for the model (64 x TP 2)" in out
    dataset = IndexedDataset(str(tmp_path / "mix_text_document"))
    assert dataset.index.dtype == np.int32  # a vocabulary of 65500 or more needs int32, as in Megatron
    assert [dataset[i].tolist() for i in range(40)] == [
        backend.encode(d, add_special_tokens=False).ids for d in docs]


def test_merge_concatenates_datasets(tmp_path):
    prefixes = []
    for name, count in (("a", 7), ("b", 5)):
        source = write_jsonl(tmp_path / f"{name}.jsonl",
                             [{"text": d} for d in documents(count + 10)[10:]])
        data_cmd("tokenize", "--input", str(source), "--output-prefix", str(tmp_path / name),
                 "--workers", "1")
        prefixes.append(tmp_path / f"{name}_text_document")
    out = data_cmd("merge", "--input", *map(str, prefixes), "--output-prefix",
                   str(tmp_path / "ab")).stdout
    assert "merge: 12 documents" in out
    assert megatron_documents(tmp_path / "ab") == (megatron_documents(prefixes[0])
                                                   + megatron_documents(prefixes[1]))


def test_inspect_shows_a_document_as_tokens(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": "Return the sum of a and b."}])
    data_cmd("tokenize", "--input", str(source), "--output-prefix", str(tmp_path / "d"),
             "--workers", "1")
    out = data_cmd("inspect", str(tmp_path / "d_text_document"), "--tokens").stdout
    assert out.startswith(f"document 0 of {tmp_path / 'd_text_document'}: ")
    assert "[INPUT] Return the sum of a and b.<|endoftext|>" in out
    assert "'<|endoftext|>'" in out.splitlines()[-1]


# Bad input: each gets its own message, and nothing that looks complete is left behind.

def test_malformed_json_stops_with_file_and_line(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in documents(5)],
                         raw_lines={3: '{"text": "unterminated'})
    prefix = tmp_path / "out"
    process = data_cmd("tokenize", "--input", str(source), "--output-prefix", str(prefix),
                       "--workers", "2", check=False)
    assert process.returncode == 2
    assert (f"{source} line 4: malformed JSON (Unterminated string starting at column 10): "
            f"fix the line, or pass --skip-bad-lines to skip such lines and count them"
            in process.stderr)
    assert list(tmp_path.glob("out*")) == []  # neither a pair nor temporary files

    out = data_cmd("tokenize", "--input", str(source), "--output-prefix", str(prefix),
                   "--skip-bad-lines", "--workers", "2").stdout
    assert "5 documents" in out and "1 malformed line(s)" in out
    assert len(IndexedDataset(f"{prefix}_text_document")) == 5


def test_malformed_json_in_clean_and_shard(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in documents(3)],
                         raw_lines={1: "[1, 2]"})
    for verb, target in (("clean", ["--output", str(tmp_path / "c.jsonl")]),
                         ("shard", ["--output-dir", str(tmp_path / "s"), "--docs-per-shard", "2"])):
        process = data_cmd(verb, "--input", str(source), *target, check=False)
        assert process.returncode == 2
        assert (f"{source} line 2: malformed JSON (a JSON list, not an object with keys)"
                in process.stderr)
    assert not (tmp_path / "c.jsonl").exists()


def test_missing_key_names_the_keys_present(tmp_path):
    source = write_jsonl(tmp_path / "wudao.jsonl", [{"title": "t", "content": "c"}])
    process = data_cmd("tokenize", "--input", str(source), "--output-prefix",
                       str(tmp_path / "x"), check=False)
    assert process.returncode == 2
    assert (f"{source} line 1: no key 'text'; the keys present are: 'title', 'content' (choose "
            f"keys with --json-keys)" in process.stderr)
    parquet = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"body": "x"}]), parquet)
    process = data_cmd("tokenize", "--input", str(parquet), "--output-prefix",
                       str(tmp_path / "y"), check=False)
    assert f"{parquet}: no column 'text'; the columns present are: body" in process.stderr


def test_empty_documents_are_skipped_and_counted(tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl",
                         [{"text": "one document"}, {"text": ""}, {"text": "  \n"},
                          {"text": None}, {"text": "another"}])
    out = data_cmd("tokenize", "--input", str(source), "--output-prefix", str(tmp_path / "e"),
                   "--workers", "1").stdout
    assert "skipped 3 empty text" in out
    assert len(IndexedDataset(str(tmp_path / "e_text_document"))) == 2


def test_interrupted_tokenize_leaves_no_complete_looking_pair(tmp_path):
    """SIGKILL in the middle of a run: no .idx appears (a previous pair is replaced only at the
    end, its index first)."""
    docs = [{"text": d} for d in documents(400)] * 300  # about 11 MB: several chunks
    source = write_jsonl(tmp_path / "big.jsonl", docs)
    prefix = tmp_path / "big"
    process = subprocess.Popen(
        [sys.executable, "-m", "llmtrain.data", "tokenize", "--input", str(source),
         "--output-prefix", str(prefix), "--workers", "1", "--log-interval", "0"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    for line in process.stderr:  # the first progress line: it is writing
        if line.startswith("tokenize:"):
            break
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "big_text_document.idx").exists()
    assert not (tmp_path / "big_text_document.bin").exists()
    assert (tmp_path / "big_text_document.bin.tmp").exists()


def test_indexed_writer_replaces_an_old_pair_index_first(tmp_path):
    from llmtrain.data.indexed import IndexedDatasetWriter

    prefix = tmp_path / "p"
    with IndexedDatasetWriter(prefix, 100) as writer:
        writer.add_document([1, 2, 3])
    writer = IndexedDatasetWriter(prefix, 100)
    writer.add_document([4, 5])
    writer.abort()  # an interrupted rewrite keeps the old pair
    assert megatron_documents(prefix) == [[1, 2, 3]]
    with pytest.raises(ValueError, match="token id 100 is outside the vocabulary of size 100"):
        with IndexedDatasetWriter(prefix, 100) as writer:
            writer.add_document([99, 100])
    assert megatron_documents(prefix) == [[1, 2, 3]]
    assert not list(tmp_path.glob("*.tmp"))
    with IndexedDatasetWriter(prefix, 100) as writer:
        writer.add_document([7])
    assert megatron_documents(prefix) == [[7]]
