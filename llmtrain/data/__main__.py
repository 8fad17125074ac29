"""`python -m llmtrain.data <verb>`: the data pipeline from raw corpora to training data.

    clean          normalise, filter and deduplicate documents into one jsonl(.zst) file
    shard          merge inputs and split them into N-document .jsonl.zst shards
    tokenize       documents to Megatron indexed datasets; with --sft, conversations to an SFT set
    merge          concatenate indexed datasets into one
    inspect        show a document or an SFT sample as tokens, loss-masked tokens marked
    selfcognition  write the self-cognition conversations for a model name and author

Options follow Megatron-LM's tools/preprocess_data.py where they mean the same (--input,
--output-prefix, --json-keys, --append-eod, --workers, --tokenizer-type, ...).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmtrain.config.schema import SFTConfig, TokenizerConfig
from llmtrain.data.sources import DataError, check_writable
from llmtrain.data.workers import default_workers

# Megatron-LM's names for the tokenizer types, accepted as they are.
TOKENIZER_ALIASES = {"HuggingFaceTokenizer": "huggingface", "GPT2BPETokenizer": "gpt2bpe",
                     "SentencePieceTokenizer": "sentencepiece", "Llama2Tokenizer": "llama2"}
TOKENIZER_TYPES = ("huggingface", "gpt2bpe", "sentencepiece", "llama2", "corpus")


class _Keys(argparse.Action):
    """Keys given as Megatron does (`--json-keys text title`) or comma-separated."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest,
                tuple(k for v in values for k in v.replace(",", " ").split() if k))


def _add_tokenizer(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tokenizer (default: inferred from the files given; the "
                                      "embedded corpus' tokenizer when none is)")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES + tuple(TOKENIZER_ALIASES),
                       help="huggingface (a directory or tokenizer.json), gpt2bpe (vocab.json + "
                            "merges.txt), sentencepiece (a .model file), llama2 (a .model file; "
                            "BOS opens each document, as Megatron-LM's Llama2Tokenizer), corpus")
    group.add_argument("--tokenizer-model", help="tokenizer directory, tokenizer.json or .model")
    group.add_argument("--vocab-file", help="GPT-2 BPE vocab.json")
    group.add_argument("--merge-file", help="GPT-2 BPE merges.txt")
    group.add_argument("--eod-token",
                       help="the end-of-document token (default: the tokenizer's eos_token, "
                            "then sep_token, from tokenizer_config.json)")
    group.add_argument("--extra-vocab-size", type=int, default=0,
                       help="ids reserved on top of the tokenizer's vocabulary")
    group.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                       help="the model pads its vocabulary to a multiple of this x TP")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1)


def _tokenizer_cfg(args) -> TokenizerConfig | None:
    kind = TOKENIZER_ALIASES.get(args.tokenizer_type, args.tokenizer_type)
    if kind is None:
        if args.vocab_file or args.merge_file:
            kind = "gpt2bpe"
        elif args.tokenizer_model:
            kind = "sentencepiece" if args.tokenizer_model.endswith(".model") else "huggingface"
        elif args.eod_token or args.extra_vocab_size:
            kind = "corpus"
        else:
            return None
    return TokenizerConfig(tokenizer_type=kind, tokenizer_model=args.tokenizer_model,
                           vocab_file=args.vocab_file, merge_file=args.merge_file,
                           extra_vocab_size=args.extra_vocab_size, eod_token=args.eod_token)


def _add_sft(parser: argparse.ArgumentParser, flag_help: str) -> None:
    group = parser.add_argument_group("conversations (SFT)")
    group.add_argument("--sft", action="store_true", help=flag_help)
    group.add_argument("--format", default="auto",
                       choices=("auto", "alpaca", "sharegpt", "messages"))
    group.add_argument("--chat-template", default="chatml",
                       choices=("chatml", "llama3", "tokenizer"),
                       help="a named template, or the tokenizer directory's own chat_template")
    group.add_argument("--system", help="system prompt of conversations that bring none")


def _sft_cfg(args) -> SFTConfig:
    return SFTConfig(format=args.format, chat_template=args.chat_template, system=args.system)


def _workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes (default: every core, here %(default)s)")


def _log_interval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-interval", type=float, default=None,
                        help="seconds between progress lines (default: live on a terminal, "
                             "30 s otherwise)")


def _skip(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip malformed JSON lines and count them, instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llmtrain.data",
                                     description="llmtrain's data pipeline",
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n")[1])
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    clean = verbs.add_parser("clean", help="normalise, filter and deduplicate documents")
    clean.add_argument("--input", nargs="+", required=True,
                       help=".jsonl, .json, .parquet or .txt files (optionally .zst)")
    clean.add_argument("--output", required=True, help="a .jsonl or .jsonl.zst file")
    clean.add_argument("--text-keys", nargs="+", action=_Keys, default=("text",),
                       help="keys whose text makes the document, joined by newlines "
                            "(WuDao: title,content)")
    clean.add_argument("--keep-keys", nargs="+", action=_Keys, default=(), help="keys copied as they are")
    clean.add_argument("--output-key", default="text", help="key of the cleaned text")
    clean.add_argument("--min-chars", type=int, default=32,
                       help="drop documents shorter than this after cleaning")
    clean.add_argument("--min-letter-ratio", type=float, default=0.5,
                       help="drop documents where fewer of the non-space characters are letters")
    clean.add_argument("--unicode", choices=("NFC", "NFKC", "none"), default="NFC",
                       help="unicode normal form (NFKC also folds full-width forms)")
    clean.add_argument("--no-dedup", action="store_true", help="keep exact duplicates")
    _log_interval(clean)
    _workers(clean)
    _skip(clean)

    shard = verbs.add_parser("shard", help="merge and split into .jsonl.zst shards")
    shard.add_argument("--input", nargs="+", required=True)
    shard.add_argument("--output-dir", required=True)
    shard.add_argument("--docs-per-shard", type=int, required=True)
    shard.add_argument("--name", default="shard", help="shards are NAME_00000.jsonl.zst, ...")
    _log_interval(shard)
    _skip(shard)

    tokenize = verbs.add_parser("tokenize", help="documents (or conversations, --sft) to "
                                                 "Megatron indexed datasets")
    tokenize.add_argument("--input", nargs="+", required=True,
                          help=".jsonl, .jsonl.zst, .json, .parquet or .txt files")
    tokenize.add_argument("--output-prefix", required=True,
                          help="writes PREFIX_<key>_document.bin/.idx per key (with --sft: "
                               "PREFIX_sft_tokens, PREFIX_sft_loss_mask and PREFIX_sft.json)")
    tokenize.add_argument("--json-keys", nargs="+", action=_Keys, default=("text",),
                          help="keys to tokenize, one dataset each (default: text)")
    tokenize.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                          help="end every document with the end-of-document token")
    tokenize.add_argument("--tokenizer-hf-no-include-special-tokens", action="store_true",
                          help="do not add the tokenizer's template tokens (BOS of Llama-style "
                               "tokenizers, [CLS]/[SEP] of BERT-style ones) to documents; "
                               "Megatron-LM's default, and llmtrain's, adds them")
    _log_interval(tokenize)
    _workers(tokenize)
    _skip(tokenize)
    _add_tokenizer(tokenize)
    _add_sft(tokenize, "the inputs are conversations: write an SFT set (tokens + loss mask)")

    merge = verbs.add_parser("merge", help="concatenate indexed datasets")
    merge.add_argument("--input", nargs="+", required=True,
                       help="dataset prefixes, their .bin/.idx files (tok/*.bin), or folders "
                            "(every pair in them, sorted by name)")
    merge.add_argument("--output-prefix", required=True)
    _log_interval(merge)

    show = verbs.add_parser("inspect", help="show a document or SFT sample as tokens")
    show.add_argument("target", help="a dataset prefix, an SFT set prefix, or a raw file")
    show.add_argument("--index", type=int, nargs="+", default=[0], help="which (default 0)")
    show.add_argument("--json-keys", nargs="+", action=_Keys, default=("text",),
                      help="the key to show of raw documents")
    show.add_argument("--tokens", action="store_true", help="also one line per token")
    _add_tokenizer(show)
    _add_sft(show, "the raw file holds conversations: show them through the chat template")

    selfcog = verbs.add_parser("selfcognition", help="write the self-cognition conversations")
    selfcog.add_argument("--output", required=True, help="a .jsonl file")
    selfcog.add_argument("--model-name", required=True)
    selfcog.add_argument("--model-author", required=True)
    selfcog.add_argument("--format", default="messages",
                         choices=("messages", "sharegpt", "alpaca"))
    return parser


def _describe_tokenizer(cfg: TokenizerConfig | None, args) -> str:
    from llmtrain.config.validate import padded_vocab_size
    from llmtrain.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg or TokenizerConfig())
    padded = padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                               args.tensor_model_parallel_size)
    extra = f" (+{tokenizer.extra_vocab_size} extra)" if tokenizer.extra_vocab_size else ""
    eod = (f"; documents end with id {tokenizer.eod_id}: {tokenizer.eod_note}"
           if not args.sft and args.append_eod and tokenizer.eod_id is not None else "")
    return (f"tokenizer {tokenizer.kind}: {tokenizer.vocab_size} tokens{extra}, padded to "
            f"{padded} for the model ({args.make_vocab_size_divisible_by} x TP "
            f"{args.tensor_model_parallel_size}){eod}")


def _output_folder(args) -> tuple[Path, str]:
    """Where a verb writes, and the option that says so."""
    if args.verb == "shard":
        return Path(args.output_dir), f"--output-dir {args.output_dir}"
    if args.verb in ("clean", "selfcognition"):
        return Path(args.output).parent, f"--output {args.output}"
    return Path(args.output_prefix).parent, f"--output-prefix {args.output_prefix}"


def run(args) -> None:
    if args.verb != "inspect":
        check_writable(*_output_folder(args))
    if args.verb == "clean":
        from llmtrain.data.clean import CleanOptions, clean_files

        options = CleanOptions(text_keys=args.text_keys, keep_keys=args.keep_keys,
                               output_key=args.output_key, min_chars=args.min_chars,
                               min_letter_ratio=args.min_letter_ratio,
                               unicode_form=None if args.unicode == "none" else args.unicode,
                               dedup=not args.no_dedup, skip_bad_lines=args.skip_bad_lines)
        s = clean_files(args.input, args.output, options, workers=args.workers,
                        log_interval=args.log_interval)
        dropped = ", ".join(f"{count} {reason.replace('_', ' ')}"
                            for reason, count in s.dropped.items())
        print(f"clean: read {s.read} documents, kept {s.kept}, dropped {dropped}; "
              f"{s.bad_lines} malformed line(s) skipped; {s.seconds:.1f} s -> {args.output}")
    elif args.verb == "shard":
        from llmtrain.data.shard import shard_files

        s = shard_files(args.input, args.output_dir, args.docs_per_shard, args.name,
                        args.skip_bad_lines, log_interval=args.log_interval)
        print(f"shard: {s.documents} documents in {len(s.shards)} shard(s) of up to "
              f"{args.docs_per_shard}; {s.bad_lines} malformed line(s) skipped -> "
              f"{args.output_dir}/{args.name}_*.jsonl.zst")
    elif args.verb == "tokenize":
        cfg = _tokenizer_cfg(args) or TokenizerConfig()
        print(_describe_tokenizer(cfg, args), flush=True)
        if args.sft:
            from llmtrain.data.sft import write_tokenized

            s = write_tokenized(args.input, args.output_prefix, cfg, _sft_cfg(args),
                                workers=args.workers, skip_bad_lines=args.skip_bad_lines)
            print(f"tokenize: {s.samples} conversations, {s.tokens} tokens ({s.trained_tokens} "
                  f"trained) in {s.seconds:.1f} s; {s.bad_lines} malformed line(s) skipped -> "
                  f"{args.output_prefix}_sft.json")
            return
        from llmtrain.data.preprocess import tokenize_files

        s = tokenize_files(args.input, args.output_prefix, cfg, args.json_keys,
                           append_eod=args.append_eod, workers=args.workers,
                           skip_bad_lines=args.skip_bad_lines, log_interval=args.log_interval,
                           special_tokens=not args.tokenizer_hf_no_include_special_tokens)
        empty = ", ".join(f"{n} empty {key}" for key, n in s.empty.items())
        print(f"tokenize: {s.documents} documents, {s.tokens} tokens in {s.seconds:.1f} s "
              f"({s.documents / s.seconds:,.0f} docs/s, {s.tokens / s.seconds:,.0f} tokens/s); "
              f"skipped {empty} and {s.bad_lines} malformed line(s) -> "
              + ", ".join(f"{p}.bin/.idx" for p in s.outputs))
    elif args.verb == "merge":
        from llmtrain.data.indexed import (IndexedDatasetReader, IndexedDatasetWriter,
                                           dataset_prefixes)

        prefixes = dataset_prefixes(args.input, skip=args.output_prefix)
        readers = [IndexedDatasetReader(prefix) for prefix in prefixes]  # all there, first
        from llmtrain.data.workers import Progress

        meter = Progress("merge", interval=args.log_interval)
        try:
            with IndexedDatasetWriter(args.output_prefix, dtype=readers[0].dtype.type) as writer:
                for prefix, reader in zip(prefixes, readers):
                    writer.add_index(prefix)
                    meter.update(len(reader), int(reader.sequence_lengths.sum()))
        finally:
            meter.close()
        print(f"merge: {len(writer.sequence_lengths)} documents, {writer.num_tokens} tokens -> "
              f"{args.output_prefix}.bin/.idx")
    elif args.verb == "inspect":
        from llmtrain.data.show import inspect

        for index in args.index:
            print(inspect(args.target, index, _tokenizer_cfg(args),
                          _sft_cfg(args) if args.sft else None, args.json_keys[0], args.tokens))
    elif args.verb == "selfcognition":
        from llmtrain.data import selfcognition

        count = selfcognition.write(args.output, args.model_name, args.model_author, args.format)
        print(f"selfcognition: {count} conversations ({args.format}) -> {args.output}")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (DataError, FileNotFoundError, ValueError) as error:  # bad input: nothing published
        print(f"llmtrain.data {args.verb}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # the reader stopped early (`inspect ... | head`): that is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    except KeyboardInterrupt:
        print(f"llmtrain.data {args.verb}: interrupted; nothing partial was published",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
