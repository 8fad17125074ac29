"""The embedded default corpus: text that is on every machine, with no network.

Documents are the docstrings of Python's standard library (modules, classes and functions), read
from the source files with `ast` (nothing is imported). A byte-level BPE tokenizer is trained on
them with `tokenizers` (with ChatML's `<|im_start|>`/`<|im_end|>` as special tokens, so that
instruction tuning runs on it too), and the documents are written as a Megatron indexed dataset. Everything is
built once and cached under `$LLMTRAIN_CACHE` (default `~/.cache/llmtrain`), keyed by the Python
version and the build recipe.
"""

from __future__ import annotations

import ast
import fcntl
import os
import shutil
import sys
import sysconfig
from pathlib import Path

VOCAB_SIZE = 4096
EOD = "<|endoftext|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
RECIPE = 2  # bump when the way the corpus is built changes
MIN_CHARS = 40


def cache_root() -> Path:
    return Path(os.environ.get("LLMTRAIN_CACHE", Path.home() / ".cache" / "llmtrain"))


def corpus_dir() -> Path:
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / "corpus" / f"stdlib-docs-{version}-v{VOCAB_SIZE}-r{RECIPE}"


def corpus_tokenizer_path() -> Path:
    return ensure_corpus() / "tokenizer.json"


def corpus_prefix() -> Path:
    """The indexed dataset prefix of the corpus (`<prefix>.bin/.idx`)."""
    return ensure_corpus() / "stdlib_docs_text_document"


def documents() -> list[str]:
    """Distinct docstrings of the standard library, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen, docs = set(), []
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts or "tests" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_CHARS and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
    return docs


def _build(target: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmtrain.data.indexed import IndexedDatasetWriter

    docs = documents()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOD, *CHAT_TOKENS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(docs, trainer=trainer)
    tokenizer.save(str(target / "tokenizer.json"))
    eod = tokenizer.token_to_id(EOD)
    with IndexedDatasetWriter(target / "stdlib_docs_text_document",
                              tokenizer.get_vocab_size()) as writer:
        for encoding in tokenizer.encode_batch(docs):
            writer.add_document(encoding.ids + [eod])


def ensure_corpus() -> Path:
    """Build the corpus unless it is cached; safe when several processes ask at once."""
    target = corpus_dir()
    if (target / "READY").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "READY").exists():
            building = target.with_name(target.name + ".building")
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir()
            print(f"[llmtrain] building the default corpus (Python's standard-library "
                  f"documentation) into {target}", flush=True)
            _build(building)
            (building / "READY").touch()
            shutil.rmtree(target, ignore_errors=True)
            os.replace(building, target)
    return target
