"""Tokenizers behind one small interface: `encode`, `decode`, `vocab_size`, `eod`, `pad`.

Kinds (data.tokenizer.tokenizer_type): `corpus` (the embedded corpus' BPE), `huggingface`
(a tokenizer directory or a tokenizer.json), `gpt2bpe` (vocab.json + merges.txt),
`sentencepiece` (a .model file) and `null` (no text: ids only, for mock data).

`vocab_size` counts `extra_vocab_size` reserved ids on top of the tokenizer's own (Megatron's
--extra-vocab-size); the model pads its embedding further (config.validate.padded_vocab_size).
"""

from __future__ import annotations

import hashlib
import os
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
    # The tokenizer directory or file it was loaded from (chat templates live there).
    source: Optional[Path] = None
    extra_vocab_size: int = 0
    # sentencepiece threads for a batch (None: its default, all cores).
    threads: Optional[int] = None

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without special tokens (documents get EOD appended by callers).
        Special tokens written in the text (`<|im_end|>`) still map to their ids."""
        if self.kind == "sentencepiece":
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return self.backend.encode(texts, num_threads=self.threads)
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], keep_special: bool = False) -> str:
        """Text of ids; `keep_special` writes special tokens out (`<|im_end|>`)."""
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return self.backend.decode(ids)
        return self.backend.decode(ids, skip_special_tokens=not keep_special)

    def token_id(self, token: str) -> Optional[int]:
        """The id of a token of the vocabulary (special tokens included), else None."""
        if self.kind == "sentencepiece":
            piece = self.backend.piece_to_id(token)  # the unknown id when it is not a piece
            return piece if self.backend.id_to_piece(piece) == token else None
        return self.backend.token_to_id(token)

    def token_text(self, token: int) -> str:
        """One token as text (its piece), for showing tokens one by one."""
        if self.kind == "sentencepiece":
            return self.backend.id_to_piece(int(token))
        return self.backend.decode([int(token)], skip_special_tokens=False)

    def single_threaded(self) -> "Tokenizer":
        """Encode batches on one core: for worker processes that each own a core."""
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        self.threads = 1
        return self


def _file_hash(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def _from_tokenizers(backend, kind: str, identity: str, source: Optional[Path] = None,
                     extra: int = 0) -> Tokenizer:
    vocab = backend.get_vocab(with_added_tokens=True)
    eod = next((vocab[t] for t in EOD_CANDIDATES if t in vocab), None)
    if eod is None:
        raise ValueError(f"the tokenizer has none of the end-of-document tokens "
                         f"{', '.join(EOD_CANDIDATES)}: add one to it")
    pad = vocab.get("<pad>", -1)
    return Tokenizer(kind, backend, backend.get_vocab_size(with_added_tokens=True) + extra, eod,
                     pad, identity=identity, source=source, extra_vocab_size=extra)


def load_tokenizer(cfg: TokenizerConfig, vocab_size: Optional[int] = None) -> Tokenizer:
    """Load the tokenizer a data config names; `vocab_size` is the model's (for `null`)."""
    kind = cfg.tokenizer_type
    extra = cfg.extra_vocab_size
    if extra < 0:
        raise ValueError(f"data.tokenizer.extra_vocab_size={extra} must not be negative")
    if kind == "null":
        if vocab_size is None:
            raise ValueError("the null tokenizer needs the model's vocab_size")
        return Tokenizer("null", None, vocab_size, eod=vocab_size - 1, identity="null")
    if kind == "corpus":
        from llmtrain.data.corpus import corpus_tokenizer_path

        path = corpus_tokenizer_path()
        from tokenizers import Tokenizer as HFTokenizer

        return _from_tokenizers(HFTokenizer.from_file(str(path)), "corpus", _file_hash(path),
                                path, extra)
    if kind == "huggingface":
        path = Path(_required(cfg.tokenizer_model, "data.tokenizer.tokenizer_model"))
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}: point "
                                    f"data.tokenizer.tokenizer_model at a Hugging Face tokenizer "
                                    f"directory or a tokenizer.json file")
        from tokenizers import Tokenizer as HFTokenizer

        return _from_tokenizers(HFTokenizer.from_file(str(file)), "huggingface", _file_hash(file),
                                path, extra)
    if kind == "gpt2bpe":
        vocab = Path(_required(cfg.vocab_file, "data.tokenizer.vocab_file"))
        merges = Path(_required(cfg.merge_file, "data.tokenizer.merge_file"))
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        backend = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return _from_tokenizers(backend, "gpt2bpe", _file_hash(vocab, merges), vocab.parent,
                                extra)
    if kind == "sentencepiece":
        model = Path(_required(cfg.tokenizer_model, "data.tokenizer.tokenizer_model"))
        import sentencepiece

        backend = sentencepiece.SentencePieceProcessor(model_file=str(model))
        eod = backend.eos_id()
        return Tokenizer("sentencepiece", backend, backend.get_piece_size() + extra, eod,
                         pad=backend.pad_id(), bos=backend.bos_id(), identity=_file_hash(model),
                         source=model, extra_vocab_size=extra)
    raise ValueError(f"unknown tokenizer_type {kind!r}: choose one of corpus, huggingface, "
                     f"gpt2bpe, sentencepiece, null")


def _required(value: Optional[str], key: str) -> str:
    if not value:
        raise ValueError(f"{key} is not set: give the tokenizer's files ({key}=...)")
    return value
