"""Tokenization throughput of `python -m llmtrain.data tokenize` against its ceiling.

The ceiling is the tokenizer's own batch encoding of the same texts, already in memory, on every
core (`encode_batch` of Hugging Face tokenizers runs its Rust thread pool; sentencepiece gets
one thread per core). llmtrain's figure is the whole command's work: read jsonl, parse JSON,
encode in worker processes, write the .bin/.idx pair. Rounds alternate between the two (each
ceiling in a fresh process, as a user's run starts fresh) and medians are compared.

    make bench-data                       # the embedded corpus' tokenizer, 16 MB of text
    make bench-data BENCH_ARGS="--tokenizer-model /models/Qwen2.5-7B --megabytes 64"
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

from llmtrain.config.schema import TokenizerConfig
from llmtrain.data.corpus import documents
from llmtrain.data.preprocess import tokenize_files
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.data.workers import default_workers


def ceiling(cfg: TokenizerConfig, path: str, cores: int, queue) -> None:
    """Tokens per second of the tokenizer's own batch encoding (run in a fresh process)."""
    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    tokenizer = load_tokenizer(cfg)
    began = time.perf_counter()
    if tokenizer.kind == "sentencepiece":
        tokens = sum(map(len, tokenizer.backend.encode(texts, num_threads=cores)))
    else:
        encodings = tokenizer.backend.encode_batch(texts, add_special_tokens=False)
        tokens = sum(len(e.ids) for e in encodings)
    queue.put((tokens, time.perf_counter() - began))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-model", help="a Hugging Face tokenizer directory, "
                                                  "tokenizer.json or sentencepiece .model")
    parser.add_argument("--megabytes", type=float, default=16.0, help="text to tokenize")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=default_workers())
    args = parser.parse_args()

    if args.tokenizer_model:
        kind = "sentencepiece" if args.tokenizer_model.endswith(".model") else "huggingface"
        cfg = TokenizerConfig(tokenizer_type=kind, tokenizer_model=args.tokenizer_model)
    else:
        cfg = TokenizerConfig()
    docs = documents()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl"
        size = 0
        with open(path, "w", encoding="utf-8") as out:
            while size < args.megabytes * 1e6:
                for doc in docs:
                    line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
                    out.write(line)
                    size += len(line.encode())
        print(f"bench-data: {size / 1e6:.1f} MB of jsonl ({load_tokenizer(cfg).kind} tokenizer), "
              f"{args.workers} cores, {args.rounds} rounds", flush=True)
        context = multiprocessing.get_context("spawn")
        theirs, ours = [], []
        for round_ in range(1, args.rounds + 1):
            queue = context.Queue()
            process = context.Process(target=ceiling, args=(cfg, str(path), args.workers, queue))
            process.start()
            tokens, seconds = queue.get()
            process.join()
            theirs.append(tokens / seconds)
            began = time.perf_counter()  # everything the command does, start-up included
            summary = tokenize_files([path], Path(tmp) / "out", cfg, workers=args.workers,
                                     append_eod=False, progress=False)
            seconds = time.perf_counter() - began
            if summary.tokens != tokens:
                raise SystemExit(f"token counts differ: {summary.tokens} vs {tokens}")
            ours.append(summary.tokens / seconds)
            print(f"  round {round_}: encode_batch {theirs[-1] / 1e6:.3f} M tokens/s, "
                  f"llmtrain tokenize {ours[-1] / 1e6:.3f} M tokens/s "
                  f"({ours[-1] / theirs[-1]:.2f})", flush=True)
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"bench-data: llmtrain tokenize {statistics.median(ours) / 1e6:.3f} M tokens/s = "
          f"{ratio:.2f} x the tokenizer's own encode_batch "
          f"({statistics.median(theirs) / 1e6:.3f} M tokens/s), medians of {args.rounds} rounds")


if __name__ == "__main__":
    main()
