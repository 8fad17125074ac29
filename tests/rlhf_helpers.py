"""Toy alignment data the rlhf tests write (separable preference pairs, arithmetic prompts), and a
reward server of the kind stage.alignment.reward=remote calls."""

from __future__ import annotations

import json
import random
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Tiny, fast runs of the `tiny` model on CPU.
TINY = ["data.seq_length=32", "optim.lr=1e-3", "optim.min_lr=1e-3", "optim.lr_decay_style=constant",
        "checkpoint.save_interval=0"]
# Rollouts of the toy arithmetic task: short replies scored by exact_match (the right sum) plus
# digits (the share of digits in the reply, a dense credit a random policy can find).
ROLLOUTS = ["stage.alignment.reward_weights.exact_match=1.0",
            "stage.alignment.reward_weights.digits=1.0", "stage.alignment.max_new_tokens=8"]


def mean(values):
    return sum(values) / len(values)


def assert_reward_rises(reward: list[float]) -> None:
    """The last three steps' mean reward is well above the first three's."""
    assert mean(reward[-3:]) > max(3 * mean(reward[:3]), 0.05), reward


def separable_pairs(path: Path, count: int = 200, seed: int = 0) -> Path:
    """Pairs whose chosen reply is always polite and the rejected one always curt: a reward
    model can tell them apart from the reply alone."""
    rng = random.Random(seed)
    topics = ["the weather", "a recipe", "the train", "a book", "the garden", "music"]
    with open(path, "w") as out:
        for i in range(count):
            prompt = f"Tell me about {rng.choice(topics)}, item {i}."
            out.write(json.dumps({"prompt": prompt, "chosen": "Gladly, thank you.",
                                  "rejected": "No."}) + "\n")
    return path


def separable_unpaired(path: Path, count: int = 64, seed: int = 0) -> Path:
    """Unpaired examples, KTO's data: the polite reply desirable, the curt one not, each prompt
    with one of them."""
    rng = random.Random(seed)
    topics = ["the weather", "a recipe", "the train", "a book", "the garden", "music"]
    with open(path, "w") as out:
        for i in range(count):
            desirable = i % 2 == 0
            out.write(json.dumps({"prompt": f"Tell me about {rng.choice(topics)}, item {i}.",
                                  "completion": "Gladly, thank you." if desirable else "No.",
                                  "label": desirable}) + "\n")
    return path


def arithmetic_prompts(path: Path, count: int = 64, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as out:
        for _ in range(count):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            out.write(json.dumps({"prompt": f"{a}+{b}=", "answer": a + b}) + "\n")
    return path


@contextmanager
def reward_server(score):
    """A reward server on localhost, as stage.alignment.reward=remote asks one (docs/rlhf.md):
    `score(request)` gives the answer's JSON; yields (url, the requests it got)."""
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(request)
            body = json.dumps(score(request)).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/rewards", requests
    finally:
        server.shutdown()
        server.server_close()
