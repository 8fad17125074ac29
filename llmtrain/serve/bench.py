"""`python -m llmtrain.serve.bench`: a serving load benchmark. A real `python -m llmtrain.serve`
process and clients streaming completions over HTTP (httpx, from threads), at each
--concurrency level: time to first token (p50, p99) and output tokens/s, for the decode engine
(continuous batching) beside Megatron-Core's engine (engine=megatron: static batches) on the same
checkpoint, in the same run.

Each request sends --prompt-length random prompt tokens and streams exactly --new-tokens tokens
(ignore_eos); each level sends --requests-per-client requests per client. The model is a zoo model
with random weights (model=<name>) or a Hugging Face folder (--hf), converted first. Not a test:
nothing here asserts a speed.

    python -m llmtrain.serve.bench model=llama3_2_1b --concurrency 1,8,64
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llmtrain.evaluate.server import started
from llmtrain.generate.bench import DTYPES, converted, random_hf, word_tokenizer, zoo_model


def one_request(client, url: str, prompt: list[int], new_tokens: int
                ) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the last, tokens) of one streamed completion
    (server-sent events, as OpenAI's clients read them)."""
    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - began
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - began, tokens


def load(url: str, concurrency: int, requests: int, prompts: list[list[int]],
         new_tokens: int) -> dict:
    """`requests` completions from `concurrency` clients at once."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(timeout=3600, limits=limits) as client, \
            ThreadPoolExecutor(concurrency) as pool:
        began = time.perf_counter()
        done = list(pool.map(lambda i: one_request(client, url, prompts[i % len(prompts)],
                                                   new_tokens), range(requests)))
        seconds = time.perf_counter() - began
    firsts = sorted(d[0] for d in done)
    return {"ttft_p50": statistics.median(firsts),
            "ttft_p99": firsts[min(len(firsts) - 1, round(0.99 * (len(firsts) - 1)))],
            "tokens_per_second": sum(d[2] for d in done) / seconds,
            "tokens": sum(d[2] for d in done)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", help="a Hugging Face model folder (else model=<name>)")
    parser.add_argument("--concurrency", default="1,8,64",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--engines", default="auto,megatron",
                        help="the servers to load, one after the other")
    parser.add_argument("overrides", nargs="*", help="model=<name> (conf/model/)")
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    rows = max(args.concurrency)
    with tempfile.TemporaryDirectory(prefix="llmtrain-serve-bench-") as scratch:
        if args.hf:
            hf = Path(args.hf)
        else:
            model = zoo_model(args.overrides)
            hf = random_hf(model, Path(scratch) / model.name, DTYPES[args.dtype])
            word_tokenizer(hf, model.vocab_size)
        mcore = converted(hf, Path(scratch) / "mcore", args.dtype)
        vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
        rng = random.Random(0)
        prompts = [[rng.randrange(vocab) for _ in range(args.prompt_length)]
                   for _ in range(rows)]
        figures = {}
        length = args.prompt_length + args.new_tokens
        for engine in args.engines.split(","):
            with started(str(mcore), [f"engine={engine}", f"dtype={args.dtype}",
                                      f"inference_max_batch_size={rows}", "batch_wait_ms=2",
                                      f"inference_max_seq_length={length}"]) as served:
                load(served.url, 1, 1, prompts, 8)  # warm-up (and CUDA graphs of batch 1)
                figures[engine] = {c: load(served.url, c, c * args.requests_per_client, prompts,
                                           args.new_tokens) for c in args.concurrency}
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{hf.name}, {args.dtype}, {where}: {args.prompt_length} prompt + {args.new_tokens} "
          f"streamed tokens per request, {args.requests_per_client} requests per client",
          file=sys.stderr)
    print(f"{'engine':>10}{'clients':>9}{'TTFT p50 s':>12}{'TTFT p99 s':>12}"
          f"{'output tokens/s':>17}")
    for engine, levels in figures.items():
        for c, f in levels.items():
            print(f"{engine:>10}{c:>9}{f['ttft_p50']:>12.3f}{f['ttft_p99']:>12.3f}"
                  f"{f['tokens_per_second']:>17,.1f}")
    if len(figures) == 2:
        a, b = figures.values()
        print("ratio of output tokens/s: " + ", ".join(
            f"{c} clients {a[c]['tokens_per_second'] / b[c]['tokens_per_second']:.2f}x"
            for c in args.concurrency))


if __name__ == "__main__":
    main()
