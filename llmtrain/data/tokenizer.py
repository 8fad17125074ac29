"""Tokenizers behind one small interface: `encode`, `decode`, `vocab_size`, `eod`, `pad`.

Kinds (data.tokenizer.tokenizer_type): `corpus` (the embedded corpus' BPE), `huggingface`
(a tokenizer directory or a tokenizer.json), `gpt2bpe` (vocab.json + merges.txt),
`sentencepiece` (a .model file) and `null` (no text: ids only, for mock data).

`vocab_size` counts `extra_vocab_size` reserved ids on top of the tokenizer's own (Megatron's
--extra-vocab-size); the model pads its embedding further (config.validate.padded_vocab_size).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from llmtrain.config.schema import TokenizerConfig

# Tried in order only when a tokenizer declares no end-of-document token: a bare tokenizer.json,
# GPT-2's vocab.json + merges.txt (Megatron-LM's GPT2BPETokenizer ends documents with
# <|endoftext|>), the corpus tokenizer.
UNDECLARED_EOD = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|im_end|>")
# The special tokens transformers reads from a tokenizer directory, in the order they are
# tried for the end of a document: eos_token as Megatron-LM's HuggingFaceTokenizer.eod, then
# sep_token (BERT-style tokenizers declare no eos_token).
EOD_ROLES = ("eos_token", "sep_token")


@dataclass
class Tokenizer:
    """A loaded tokenizer. `backend` is the library object (tokenizers, transformers or
    sentencepiece) for callers that need more, such as chat templates."""

    kind: str
    backend: Any
    vocab_size: int
    # The end-of-document id (`eod`), None when the tokenizer has none: `eod_note` then says
    # how to give one, else where it came from. Only callers that need one ask for it.
    eod_id: Optional[int]
    pad: int = -1
    bos: Optional[int] = None
    identity: str = ""
    # The tokenizer directory or file it was loaded from (chat templates live there).
    source: Optional[Path] = None
    extra_vocab_size: int = 0
    # sentencepiece threads for a batch (None: its default, all cores).
    threads: Optional[int] = None
    # A Llama 2 tokenizer (a SentencePiece model): BOS is its template token, as Megatron-LM's
    # Llama2Tokenizer opens every text with it.
    template_bos: bool = False
    eod_note: str = ""

    @property
    def eod(self) -> int:
        if self.eod_id is None:
            from llmtrain.data.sources import DataError

            raise DataError(self.eod_note)
        return self.eod_id

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without special tokens (documents get EOD appended by callers).
        Special tokens written in the text (`<|im_end|>`) still map to their ids."""
        if self.kind == "sentencepiece":
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], special_tokens: bool = False) -> list[list[int]]:
        """Token ids of texts; `special_tokens` adds the tokenizer's template tokens (the
        post-processor of tokenizer.json: BOS for Llama-style tokenizers, [CLS] ... [SEP] for
        BERT-style ones), as transformers' add_special_tokens=True does. A SentencePiece model
        has none (Megatron-LM's SentencePieceTokenizer adds none), a Llama 2 one BOS."""
        if self.kind == "sentencepiece":
            encoded = self.backend.encode(texts, num_threads=self.threads)
            if special_tokens and self.template_bos:
                return [[self.bos] + ids for ids in encoded]
            return encoded
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=special_tokens)]

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


def declared_tokens(directory: Optional[Path]) -> dict[str, str]:
    """The special tokens (eos_token, sep_token, ...) a tokenizer directory declares: its
    tokenizer_config.json, overridden by special_tokens_map.json, as transformers reads them."""
    declared: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = directory / name if directory else None
        if file is None or not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ValueError(f"{file} is not readable JSON ({error}): fix or remove it") from None
        for role, value in data.items() if isinstance(data, dict) else ():
            value = value.get("content") if isinstance(value, dict) else value
            if role.endswith("_token") and isinstance(value, str) and value:
                declared[role] = value
    return declared


def _choose_eod(token_id, cfg: TokenizerConfig, declared: dict[str, str],
                where: Optional[Path]) -> tuple[Optional[int], str]:
    """(eod id, where it came from) or (None, how to give one). `token_id` maps a token to its
    id or None; `declared` are the special tokens the tokenizer declares ({} for a bare
    tokenizer.json); `where` is the tokenizer_config.json that could declare one."""
    config = f", or add \"eos_token\": \"TOKEN\" to {where}" if where else ""
    how = (f"pass --eod-token TOKEN (data.tokenizer.eod_token=TOKEN in training) naming a token "
           f"of its vocabulary{config}; with --no-append-eod no end-of-document token is needed")
    if cfg.eod_token:
        found = token_id(cfg.eod_token)
        if found is None:
            return None, f"eod_token {cfg.eod_token!r} is not a token of the tokenizer: {how}"
        return found, f"eod_token {cfg.eod_token!r}"
    for role in EOD_ROLES:
        if role in declared:
            found = token_id(declared[role])
            if found is None:
                return None, (f"the tokenizer's {role} {declared[role]!r} is not in its "
                              f"vocabulary: {how}")
            return found, f"its {role} {declared[role]!r}"
    if declared:
        return None, f"the tokenizer declares no eos_token or sep_token: {how}"
    found = next((t for t in UNDECLARED_EOD if token_id(t) is not None), None)
    if found is None:
        return None, (f"the tokenizer declares no end-of-document token and has none of "
                      f"{', '.join(UNDECLARED_EOD)}: {how}")
    return token_id(found), f"{found!r} (the tokenizer declares no eos_token)"


def _from_tokenizers(backend, kind: str, identity: str, cfg: TokenizerConfig,
                     source: Optional[Path] = None, declared: Optional[dict] = None) -> Tokenizer:
    # A tokenizer.json saved with truncation or padding on would cut and pad every document;
    # lengths are ours to decide (transformers turns both off for a call that asks for neither).
    backend.no_truncation()
    backend.no_padding()
    vocab = backend.get_vocab(with_added_tokens=True)
    where = None
    if declared is not None:  # a Hugging Face tokenizer: its directory may declare one
        where = (source if source.is_dir() else source.parent) / "tokenizer_config.json"
    eod, note = _choose_eod(vocab.get, cfg, declared or {}, where)
    pad = vocab.get("<pad>", -1)
    extra = cfg.extra_vocab_size
    return Tokenizer(kind, backend, backend.get_vocab_size(with_added_tokens=True) + extra, eod,
                     pad, identity=identity, source=source, extra_vocab_size=extra, eod_note=note)


def load_tokenizer(cfg: TokenizerConfig, vocab_size: Optional[int] = None) -> Tokenizer:
    """Load the tokenizer a data config names; `vocab_size` is the model's (for `null`)."""
    kind = cfg.tokenizer_type
    extra = cfg.extra_vocab_size
    if extra < 0:
        raise ValueError(f"data.tokenizer.extra_vocab_size={extra} must not be negative")
    if kind == "null":
        if vocab_size is None:
            raise ValueError("the null tokenizer needs the model's vocab_size")
        return Tokenizer("null", None, vocab_size, vocab_size - 1, identity="null")
    if kind == "corpus":
        from llmtrain.data.corpus import corpus_tokenizer_path

        path = corpus_tokenizer_path()
        from tokenizers import Tokenizer as HFTokenizer

        return _from_tokenizers(HFTokenizer.from_file(str(path)), "corpus", _file_hash(path),
                                cfg, path)
    if kind == "huggingface":
        path = Path(_required(cfg.tokenizer_model, "data.tokenizer.tokenizer_model"))
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json at {path}: point "
                                    f"data.tokenizer.tokenizer_model at a Hugging Face tokenizer "
                                    f"directory or a tokenizer.json file")
        from tokenizers import Tokenizer as HFTokenizer

        return _from_tokenizers(HFTokenizer.from_file(str(file)), "huggingface", _file_hash(file),
                                cfg, path, declared_tokens(file.parent))
    if kind == "gpt2bpe":
        vocab = Path(_required(cfg.vocab_file, "data.tokenizer.vocab_file"))
        merges = Path(_required(cfg.merge_file, "data.tokenizer.merge_file"))
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        backend = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return _from_tokenizers(backend, "gpt2bpe", _file_hash(vocab, merges), cfg, vocab.parent)
    if kind in ("sentencepiece", "llama2"):
        model = Path(_required(cfg.tokenizer_model, "data.tokenizer.tokenizer_model"))
        import sentencepiece

        backend = sentencepiece.SentencePieceProcessor(model_file=str(model))
        llama2 = kind == "llama2"
        if llama2 and backend.bos_id() < 0:
            raise ValueError(f"tokenizer_type llama2 opens each text with BOS, but {model} has "
                             f"no BOS piece: use tokenizer_type sentencepiece")
        tokenizer = Tokenizer("sentencepiece", backend, backend.get_piece_size() + extra, None,
                              pad=backend.pad_id(), bos=backend.bos_id(),
                              identity=_file_hash(model) + ("+bos" if llama2 else ""),
                              source=model, extra_vocab_size=extra, template_bos=llama2)
        eos = backend.eos_id()  # the model's own end of sequence, -1 when it has none
        declared = {"eos_token": backend.id_to_piece(eos)} if eos >= 0 else {}
        tokenizer.eod_id, tokenizer.eod_note = _choose_eod(tokenizer.token_id, cfg, declared,
                                                           None)
        return tokenizer
    raise ValueError(f"unknown tokenizer_type {kind!r}: choose one of corpus, huggingface, "
                     f"gpt2bpe, sentencepiece, llama2, null")


def _required(value: Optional[str], key: str) -> str:
    if not value:
        raise ValueError(f"{key} is not set: give the tokenizer's files ({key}=...)")
    return value
