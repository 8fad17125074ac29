"""Tokenizers behind one small interface: `encode`, `decode`, `vocab_size`, `eod`, `pad`.

Kinds (data.tokenizer.tokenizer_type): `corpus` (the embedded corpus' BPE), `huggingface`
(a tokenizer directory or a tokenizer.json), `gpt2bpe` (vocab.json + merges.txt),
`sentencepiece` (a .model file) and `null` (no text: ids only, for mock data).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llmtrain.config.schema import TokenizerConfig

EOD_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>")


@dataclass
class Tokenizer:
    """A loaded tokenizer. `backend` is the library object (tokenizers, transformers or
    sentencepiece) for callers that need more, such as chat templates."""

    kind: str
    backend: Any
    vocab_size: int
    eod: int
    pad: int = -1
    bos: Optional[int] = None
    identity: str = ""

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without special tokens (documents get EOD appended by callers)."""
        if self.kind == "sentencepiece":
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self.backend.encode(texts)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(list(ids))


def _file_hash(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _from_tokenizers(backend, kind: str, identity: str) -> Tokenizer:
    vocab = backend.get_vocab(with_added_tokens=True)
    eod = next((vocab[t] for t in EOD_CANDIDATES if t in vocab), None)
    if eod is None:
        raise ValueError(f"the tokenizer has none of the end-of-document tokens "
                         f"{', '.join(EOD_CANDIDATES)}: add one to it")
    pad = vocab.get("<pad>", -1)
    return Tokenizer(kind, backend, backend.get_vocab_size(with_added_tokens=True), eod, pad,
                     identity=identity)


def load_tokenizer(cfg: TokenizerConfig, vocab_size: Optional[int] = None) -> Tokenizer:
    """Load the tokenizer a data config names; `vocab_size` is the model's (for `null`)."""
    kind = cfg.tokenizer_type
    if kind == "null":
        if vocab_size is None:
            raise ValueError("the null tokenizer needs the model's vocab_size")
        return Tokenizer("null", None, vocab_size, eod=vocab_size - 1, identity="null")
    if kind == "corpus":
        from llmtrain.data.corpus import corpus_tokenizer_path

        path = corpus_tokenizer_path()
        from tokenizers import Tokenizer as HFTokenizer

        return _from_tokenizers(HFTokenizer.from_file(str(path)), "corpus", _file_hash(path))
    if kind == "huggingface":
        path = Path(_required(cfg.tokenizer_model, "data.tokenizer.tokenizer_model"))
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}: point "
                                    f"data.tokenizer.tokenizer_model at a Hugging Face tokenizer "
                                    f"directory or a tokenizer.json file")
        from tokenizers import Tokenizer as HFTokenizer

        return _from_tokenizers(HFTokenizer.from_file(str(file)), "huggingface", _file_hash(file))
    if kind == "gpt2bpe":
        vocab = Path(_required(cfg.vocab_file, "data.tokenizer.vocab_file"))
        merges = Path(_required(cfg.merge_file, "data.tokenizer.merge_file"))
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        backend = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return _from_tokenizers(backend, "gpt2bpe", _file_hash(vocab, merges))
    if kind == "sentencepiece":
        model = Path(_required(cfg.tokenizer_model, "data.tokenizer.tokenizer_model"))
        import sentencepiece

        backend = sentencepiece.SentencePieceProcessor(model_file=str(model))
        eod = backend.eos_id()
        return Tokenizer("sentencepiece", backend, backend.get_piece_size(), eod,
                         pad=backend.pad_id(), bos=backend.bos_id(), identity=_file_hash(model))
    raise ValueError(f"unknown tokenizer_type {kind!r}")


def _required(value: Optional[str], key: str) -> str:
    if not value:
        raise ValueError(f"{key} is not set")
    return value
