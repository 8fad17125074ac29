"""Perplexity of a served model on held-out Megatron indexed datasets.

Documents run end to end (as Megatron's GPT datasets lay them out) and are cut into windows of
`seq_length` tokens; each window is scored through the server's completions API (max_tokens=0,
echo, logprobs: the log-probability of every token but the window's first). Perplexity is
exp(total negative log-likelihood / tokens scored), per dataset.
"""

from __future__ import annotations

import json
import math
import sys
import time
import urllib.request
from typing import Iterator, Optional

from llmtrain.evaluate.config import PerplexityConfig
from llmtrain.evaluate.server import Served
from llmtrain.generate.plan import InferenceError


def windows(prefix: str, length: int, limit: Optional[int]) -> Iterator[list[int]]:
    """Windows of `length` tokens of a dataset's documents end to end (the last may be
    shorter)."""
    from llmtrain.megatron.documents import documents

    pending: list[int] = []
    made = 0
    for document in documents(prefix):
        pending.extend(int(t) for t in document)
        while len(pending) >= length:
            if limit is not None and made >= limit:
                return
            yield pending[:length]
            pending = pending[length:]
            made += 1
    if len(pending) > 1 and (limit is None or made < limit):
        yield pending


def _score(served: Served, batch: list[list[int]]) -> list[list[float]]:
    body = {"model": served.model, "prompt": batch, "max_tokens": 0, "echo": True,
            "logprobs": 0, "temperature": 0}
    request = urllib.request.Request(f"{served.url}/v1/completions", method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        choices = sorted(json.loads(response.read())["choices"], key=lambda c: c["index"])
    return [c["logprobs"]["token_logprobs"][1:] for c in choices]


def run(served: Served, c: PerplexityConfig) -> dict:
    """{prefix: {"perplexity", "nll_per_token", "tokens", "windows", "seq_length"}}."""
    length = c.seq_length or served.max_length
    if not 2 <= length <= served.max_length:
        raise InferenceError(f"perplexity.seq_length={length} must lie in "
                             f"2..{served.max_length} (the server's context length)")
    results = {}
    for prefix in c.data_path:
        began = time.perf_counter()
        scored: list[float] = []
        count = 0
        batch: list[list[int]] = []
        for window in windows(prefix, length, c.max_windows):
            batch.append(window)
            if len(batch) == c.batch_size:
                scored += [v for values in _score(served, batch) for v in values]
                count += len(batch)
                batch = []
        if batch:
            scored += [v for values in _score(served, batch) for v in values]
            count += len(batch)
        if not scored:
            raise InferenceError(f"{prefix} has fewer than 2 tokens: nothing to score; give a "
                                 f"held-out set with more text")
        nll = -sum(scored) / len(scored)
        results[prefix] = {"perplexity": math.exp(nll), "nll_per_token": nll,
                           "tokens": len(scored), "windows": count, "seq_length": length}
        print(f"[evaluate] perplexity of {prefix}: {math.exp(nll):.4f} over {len(scored)} "
              f"tokens ({count} windows of {length}) in {time.perf_counter() - began:.1f} s",
              file=sys.stderr, flush=True)
    return results
