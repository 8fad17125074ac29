"""The server an evaluation talks to: one already running (server=), or one started from a
checkpoint for the evaluation (load=) as `python -m llmtrain.serve ... port=0` and stopped after
it, whatever happens."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from llmtrain.generate.plan import InferenceError

ROOT = Path(__file__).resolve().parents[2]
READY = re.compile(r"\[serve\] ready: (http://\S+)")


@dataclass(frozen=True)
class Served:
    url: str  # http://HOST:PORT
    model: str  # the name the server answers to
    max_length: int  # its context length


def describe(url: str, timeout: float = 30) -> Served:
    """What a running server serves (its /v1/models)."""
    url = url.rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=timeout) as response:
            model = json.loads(response.read())["data"][0]
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise InferenceError(f"no llmtrain server answers at {url} ({error}): start one with "
                             f"python -m llmtrain.serve load=<checkpoint>, or give load=") from None
    return Served(url, model["id"], int(model["max_model_len"]))


@contextlib.contextmanager
def started(load: str, overrides: list[str], timeout: float = 1800) -> Iterator[Served]:
    """A server for checkpoint `load` for the duration of the block."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "llmtrain.serve", f"load={load}", "port=0", *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = _wait_ready(process, timeout)
        yield describe(url)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen, timeout: float) -> str:
    found: list[str] = []

    def read():
        for line in process.stdout:
            print(line, end="", file=sys.stderr, flush=True)
            match = READY.search(line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()  # the server ended

    ready = threading.Event()
    threading.Thread(target=read, daemon=True).start()
    ended = ready.wait(timeout)
    if found:
        return found[0]
    if ended:  # its output closed before it said it was ready: it exited
        raise InferenceError(f"the server exited with status {process.wait()} before it was "
                             f"ready (its output is above)")
    raise InferenceError(f"the server was not ready after {timeout:.0f} s")
