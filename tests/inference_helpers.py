"""Reference answers from transformers for the generation, serving and evaluation tests, and a
real server process for the duration of a test module."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path

import torch

from conftest import ROOT


@lru_cache(maxsize=None)
def hf_model(folder: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def stop_ids(folder: Path) -> list[int]:
    """What llmtrain stops at: the tokenizer's end of document and generation_config.json's
    eos_token_id."""
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    eod = next(t["id"] for t in tokenizer["added_tokens"] if t["content"] == "<|endoftext|>")
    eos = json.loads((folder / "generation_config.json").read_text()).get("eos_token_id")
    return [eod] + ([eos] if isinstance(eos, int) else list(eos or []))


@torch.no_grad()
def hf_greedy(folder: Path, prompt: list[int], new: int, **kwargs) -> list[int]:
    """transformers' greedy continuation of `prompt`, ending at the first stop token."""
    stops = stop_ids(folder)
    out = hf_model(str(folder)).generate(
        torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=stops,
        pad_token_id=stops[0], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        **kwargs)[0, len(prompt):].tolist()
    for i, token in enumerate(out):
        if token in stops:
            return out[:i + 1]
    return out


@torch.no_grad()
def hf_logprobs(folder: Path, ids: list[int]) -> torch.Tensor:
    """log p(token | tokens before) for every token but the first, by transformers."""
    logits = hf_model(str(folder))(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def corpus_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


class ServerProcess:
    """`python -m llmtrain.serve <args> port=0` as a user starts it (or another of llmtrain's
    servers: `module`, with `args` alone); `url` once it is ready."""

    def __init__(self, *args: str, timeout: float = 600, module: str = "llmtrain.serve"):
        if module == "llmtrain.serve":
            args = (*args, "port=0")
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.lines: list[str] = []
        self.url = None
        ready = threading.Event()

        def read():
            for line in self.process.stdout:
                self.lines.append(line)
                found = re.search(r"\[(?:serve|critic)\] ready: (http://\S+)", line)
                if found:
                    self.url = found.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines[-60:]))

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=60) as response:
            return json.loads(response.read())

    def send(self, path: str, body, method: str = "POST") -> tuple[int, dict]:
        """(status, JSON answer) of a request, errors included. A tuple of bytes goes in chunks
        (Transfer-Encoding: chunked, no Content-Length)."""
        data = body if isinstance(body, bytes) else iter(body) if isinstance(body, tuple) \
            else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def stop(self) -> int:
        """SIGTERM, as a process manager stops it; its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)
