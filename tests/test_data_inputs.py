"""The data command on the tokenizers and mistakes users bring: tokenizers saved with truncation
or padding, end-of-document tokens declared by the tokenizer, Megatron-LM's special tokens,
empty and truncated inputs, unwritable outputs, and merge / inspect as shells use them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from conftest import ROOT, run_read_only
from data_helpers import conversations, documents, train_bpe, write_jsonl
from llmtrain.data.__main__ import main

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def data_cmd(capsys):
    """`python -m llmtrain.data ARGS` in this process (its start-up is most of a small run)."""

    def run(*args: str, check: bool = True) -> Done:
        try:
            main(list(args))
            code = 0
        except SystemExit as stopped:
            code = stopped.code
        out, err = capsys.readouterr()
        if check and code:
            raise AssertionError(f"llmtrain.data {' '.join(args)} failed ({code}):\n{err}")
        return Done(code, out, err)

    return run


def megatron_documents(prefix) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    return [dataset[i].tolist() for i in range(len(dataset))]


def train_wordpiece(directory, truncate: int | None = None):
    """A BERT-style WordPiece tokenizer ([CLS] text [SEP]) saved as tokenizer.json with the
    tokenizer_config.json a BERT checkpoint brings (no eos_token); `truncate` saves it with
    truncation and padding on, as tokenizers saved after a fine-tune carry them."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(documents(200), trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=BERT_SPECIALS, show_progress=False))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    if truncate:
        tokenizer.enable_truncation(truncate)
        tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "cls_token": "[CLS]", "sep_token": "[SEP]",
         "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}))
    return directory


def untruncated(directory):
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(directory / "tokenizer.json"))
    backend.no_truncation()
    backend.no_padding()
    return backend


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bpe")
    train_bpe(directory)
    return directory


# Tokenizers saved with truncation or padding: never applied.

def test_truncation_and_padding_of_tokenizer_json_are_not_applied(data_cmd, tmp_path):
    wordpiece = train_wordpiece(tmp_path / "bert", truncate=8)
    docs = documents(30)
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    data_cmd("tokenize", "--input", str(source), "--output-prefix", str(tmp_path / "bert"),
             "--tokenizer-model", str(wordpiece), "--workers", "1", "--no-append-eod")
    backend = untruncated(wordpiece)
    expected = [backend.encode(d).ids for d in docs]  # [CLS] ... [SEP], whole
    assert max(map(len, expected)) > 8  # the tokenizer.json would have cut these
    assert megatron_documents(tmp_path / "bert_text_document") == expected


def test_sft_ignores_the_truncation_of_tokenizer_json(data_cmd, tmp_path, bpe_dir):
    from tokenizers import Tokenizer

    from llmtrain.data import sft

    truncating = tmp_path / "truncating"
    truncating.mkdir()
    backend = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    backend.enable_truncation(6)
    backend.enable_padding(pad_id=0)
    backend.save(str(truncating / "tokenizer.json"))
    source = write_jsonl(tmp_path / "chat.jsonl", conversations())
    for directory, name in ((truncating, "cut"), (bpe_dir, "whole")):
        data_cmd("tokenize", "--sft", "--input", str(source), "--output-prefix",
                 str(tmp_path / name), "--tokenizer-model", str(directory / "tokenizer.json"),
                 "--workers", "1")
    cut, whole = sft.TokenizedSFT([tmp_path / "cut"]), sft.TokenizedSFT([tmp_path / "whole"])
    assert len(cut) == len(whole) == 3
    for i in range(3):
        assert [a.tolist() for a in cut[i]] == [a.tolist() for a in whole[i]]


# The end-of-document token: the one the tokenizer declares.

def test_documents_end_with_the_declared_eos_token(data_cmd, tmp_path, bpe_dir):
    """The tokenizer declares <|im_end|> (tokenizer_config.json) and also holds <|endoftext|>:
    documents end with <|im_end|>, as Megatron-LM's HuggingFaceTokenizer.eod gives."""
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in documents(5)])
    out = data_cmd("tokenize", "--input", str(source), "--output-prefix", str(tmp_path / "q"),
                   "--tokenizer-model", str(bpe_dir / "hf"), "--workers", "1").stdout
    im_end = untruncated(bpe_dir).token_to_id("<|im_end|>")
    assert f"documents end with id {im_end}: its eos_token '<|im_end|>'" in out
    assert {d[-1] for d in megatron_documents(tmp_path / "q_text_document")} == {im_end}


def test_a_tokenizer_without_an_end_of_document_token(data_cmd, tmp_path):
    directory = train_wordpiece(tmp_path / "bert")
    config = directory / "tokenizer_config.json"
    config.write_text(json.dumps({"unk_token": "[UNK]", "pad_token": "[PAD]"}))  # no eos, no sep
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in documents(5)])
    args = ["tokenize", "--input", str(source), "--tokenizer-model", str(directory),
            "--workers", "1"]
    refused = data_cmd(*args, "--output-prefix", str(tmp_path / "a"), check=False)
    assert refused.returncode == 2
    assert (f"the tokenizer declares no eos_token or sep_token: pass --eod-token TOKEN "
            f"(data.tokenizer.eod_token=TOKEN in training) naming a token of its vocabulary, or "
            f"add \"eos_token\": \"TOKEN\" to {config}; with --no-append-eod no "
            f"end-of-document token is needed") in refused.stderr
    assert not list(tmp_path.glob("a_*"))

    data_cmd(*args, "--output-prefix", str(tmp_path / "b"), "--no-append-eod")
    data_cmd(*args, "--output-prefix", str(tmp_path / "c"), "--eod-token", "[SEP]")
    sep = untruncated(directory).token_to_id("[SEP]")
    assert ([d + [sep] for d in megatron_documents(tmp_path / "b_text_document")]
            == megatron_documents(tmp_path / "c_text_document"))


# Megatron-LM's preprocess_data.py, byte for byte.

def llama_style(bpe_dir, directory):
    """The test BPE with a Llama 3-style template: <|begin_of_text|> before every text."""
    from tokenizers import Tokenizer, processors

    directory.mkdir()
    backend = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, backend.token_to_id(bos))])
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
         "eos_token": "<|endoftext|>"}))
    return directory


def megatron_preprocess(directory, docs, prefix, include_special_tokens: bool) -> None:
    """What tools/preprocess_data.py --append-eod writes, with Megatron-Core's own tokenizer
    (HuggingFaceTokenizer) and builder. A tokenizer without an eos_token (BERT) ends documents
    with its sep_token, as llmtrain does (Megatron-LM has no end of document for it)."""
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from megatron.core.tokenizers.text.libraries.huggingface_tokenizer import (
        HuggingFaceTokenizer)

    tokenizer = HuggingFaceTokenizer(str(directory),
                                     include_special_tokens=include_special_tokens)
    eod = tokenizer.eod if tokenizer.eod is not None else tokenizer.sep_id
    builder = IndexedDatasetBuilder(f"{prefix}.bin",
                                    dtype=DType.optimal_dtype(tokenizer.vocab_size))
    for text in docs:
        builder.add_item(torch.IntTensor(tokenizer.text_to_ids(text) + [eod]))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.mark.parametrize("kind", ["bpe", "wordpiece"])
def test_tokens_are_byte_identical_to_megatron_preprocess_data(data_cmd, tmp_path, bpe_dir,
                                                               kind):
    directory = (llama_style(bpe_dir, tmp_path / "llama") if kind == "bpe"
                 else train_wordpiece(tmp_path / "bert", truncate=8))
    docs = documents(40)
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    for name, flags in (("default", []), ("plain", ["--tokenizer-hf-no-include-special-tokens"])):
        data_cmd("tokenize", "--input", str(source), "--output-prefix", str(tmp_path / name),
                 "--tokenizer-model", str(directory), "--append-eod", "--workers", "1", *flags)
        megatron_preprocess(directory, docs, tmp_path / f"megatron_{name}", not flags)
        for ext in ("bin", "idx"):
            ours = (tmp_path / f"{name}_text_document.{ext}").read_bytes()
            assert ours == (tmp_path / f"megatron_{name}.{ext}").read_bytes(), (name, ext)
    first = megatron_documents(tmp_path / "default_text_document")[0]
    plain = megatron_documents(tmp_path / "plain_text_document")[0]
    backend = untruncated(directory)
    if kind == "bpe":
        assert first == [backend.token_to_id("<|begin_of_text|>")] + plain
    else:
        cls, sep = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        assert first == [cls] + plain[:-1] + [sep, sep]  # [CLS] text [SEP], then eod [SEP]


# Inputs that hold no document, or end early.

def truncated_zst(path, docs):
    import zstandard

    whole = zstandard.ZstdCompressor().compress(
        "".join(json.dumps({"text": d}) + "\n" for d in docs).encode())
    path.write_bytes(whole[:len(whole) // 2])
    return path


VERBS = {"tokenize": lambda out: ["--output-prefix", str(out / "tok"), "--workers", "1"],
         "clean": lambda out: ["--output", str(out / "clean.jsonl"), "--workers", "1"],
         "shard": lambda out: ["--output-dir", str(out / "shards"), "--docs-per-shard", "5"]}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_truncated_zst_and_empty_inputs_fail_leaving_nothing(data_cmd, tmp_path, verb):
    zst = truncated_zst(tmp_path / "cut.jsonl.zst", documents(300))
    out = tmp_path / "out"
    done = data_cmd(verb, "--input", str(zst), *VERBS[verb](out), check=False)
    assert done.returncode == 2
    assert (f"{zst}: truncated zstd file (zstd frame error: the file ends inside a frame): it "
            f"was cut short, as by an interrupted copy or download; copy or compress it again"
            in done.stderr)
    assert "malformed JSON" not in done.stderr

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    done = data_cmd(verb, "--input", str(empty), *VERBS[verb](out), check=False)
    assert done.returncode == 2
    assert "no documents" in done.stderr and f"0 record(s) read from {empty}" in done.stderr
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_clean_that_keeps_nothing_fails(data_cmd, tmp_path):
    source = write_jsonl(tmp_path / "short.jsonl", [{"text": "tiny"}, {"text": "tiny"}])
    done = data_cmd("clean", "--input", str(source), "--output", str(tmp_path / "c.jsonl"),
                    "--workers", "1", check=False)
    assert done.returncode == 2
    assert (f"no documents kept: 2 record(s) read from {source} (2 too short dropped), 0 "
            f"malformed line(s) skipped; nothing was written" in done.stderr)
    assert not list(tmp_path.glob("c.jsonl*"))


# Outputs that cannot be written: refused before any input is read.

def test_read_only_output_folder_is_refused_before_reading(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    missing = tmp_path / "not-read.jsonl"  # never opened: the output is checked first
    for verb, option, target, where in (
            ("clean", "--output", folder / "c.jsonl", folder),
            ("shard", "--output-dir", folder / "new", folder / "new"),
            ("tokenize", "--output-prefix", folder / "tok", folder),
            ("merge", "--output-prefix", folder / "all", folder)):
        extra = ["--docs-per-shard", "2"] if verb == "shard" else []
        done = run_read_only(folder, "llmtrain.data", verb, "--input", str(missing), option,
                             str(target), *extra)
        assert done.returncode == 2, done.stderr
        assert f"{option} {target}: cannot write to {where} (" in done.stderr
        assert "choose a folder you can write to, or make this one writable" in done.stderr
        assert "Traceback" not in done.stderr
    assert list(folder.iterdir()) == []


# merge as shells and recipes call it.

def test_merge_takes_bin_files_and_folders(data_cmd, tmp_path):
    tok = tmp_path / "tok"
    for name, count in (("b", 4), ("a", 3)):
        source = write_jsonl(tmp_path / f"{name}.jsonl", [{"text": d} for d in documents(count)])
        data_cmd("tokenize", "--input", str(source), "--output-prefix", str(tok / name),
                 "--workers", "1")
    a, b = (megatron_documents(tok / f"{n}_text_document") for n in "ab")
    bins = sorted(map(str, tok.glob("*.bin")))  # what `tok/*.bin` expands to
    data_cmd("merge", "--input", *bins, "--output-prefix", str(tmp_path / "from_bins"))
    everything = sorted(map(str, tok.iterdir()))  # `tok/*`: each pair once
    data_cmd("merge", "--input", *everything, "--output-prefix", str(tmp_path / "from_all"))
    out = data_cmd("merge", "--input", str(tok), "--output-prefix", str(tok / "merged")).stdout
    assert "merge: 7 documents" in out
    for prefix in ("from_bins", "from_all"):
        assert megatron_documents(tmp_path / prefix) == a + b
    assert megatron_documents(tok / "merged") == a + b  # sorted by name; itself left out

    (tok / "a_text_document.idx").unlink()
    done = data_cmd("merge", "--input", str(tok), "--output-prefix", str(tmp_path / "x"),
                    check=False)
    assert done.returncode == 2
    assert (f"{tok / 'a_text_document'}: {tok / 'a_text_document'}.bin or "
            f"{tok / 'a_text_document'}.idx is missing in {tok}" in done.stderr)


def test_inspect_into_head_ends_quietly(data_cmd, tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", [{"text": " ".join(documents(200))}])
    data_cmd("tokenize", "--input", str(source), "--output-prefix", str(tmp_path / "d"),
             "--workers", "1")
    inspect = [sys.executable, "-m", "llmtrain.data", "inspect", str(tmp_path / "d_text_document"),
               "--tokens", "--index", *["0"] * 20]  # megabytes of lines
    done = subprocess.run(" ".join(inspect) + " | head -n 3", shell=True, cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.stdout.startswith(f"document 0 of {tmp_path / 'd_text_document'}: ")
    assert len(done.stdout.splitlines()) == 3
    assert done.stderr == ""


def test_clean_shard_and_merge_print_progress_with_real_rates(data_cmd, tmp_path):
    source = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in documents(50)])
    runs = {
        "clean": ["--output", str(tmp_path / "c.jsonl"), "--min-chars", "1", "--workers", "1"],
        "shard": ["--output-dir", str(tmp_path / "s"), "--docs-per-shard", "20"],
        "tokenize": ["--output-prefix", str(tmp_path / "t"), "--workers", "1"]}
    lines = {}
    for verb, args in runs.items():
        lines[verb] = data_cmd(verb, "--input", str(source), *args,
                               "--log-interval", "0").stderr.splitlines()
    lines["merge"] = data_cmd("merge", "--input", str(tmp_path / "t_text_document"),
                              "--output-prefix", str(tmp_path / "m"),
                              "--log-interval", "0").stderr.splitlines()
    for verb, unit in (("clean", "B"), ("shard", "B"), ("merge", "tokens")):
        last = [line for line in lines[verb] if line.startswith(f"{verb}: ")][-1]
        docs, rest = last.removeprefix(f"{verb}: ").split(" docs, ", 1)
        assert int(docs.replace(",", "")) == 50, last
        rate = rest.rsplit(", ", 1)[1].strip()  # "623.68 kB/s", "81.20 k tokens/s"
        assert rate.endswith(f"{unit}/s") and float(rate.split()[0]) > 0, last
