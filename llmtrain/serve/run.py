"""Start the server: plan, then on the model's processes load the engine; the driver serves HTTP
(a uvicorn thread) and runs the batcher (its main thread) until SIGINT or SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
import time
from functools import partial
from typing import Callable

from llmtrain.generate import worker
from llmtrain.generate.plan import InferenceError, Plan, prepare
from llmtrain.generate.text import Text
from llmtrain.serve.config import ServeConfig


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise InferenceError(f"cannot listen on {host}:{port} ({error.strerror}): choose another "
                             f"port= (port=0 picks a free one)") from None
    sock.listen(128)
    return sock


def _application(c: ServeConfig, plan: Plan, engine, text: Text, name: str):
    """(batcher, FastAPI application, what it serves) of a language model or a reward model."""
    if plan.reward_model:
        from llmtrain.serve import rewards
        from llmtrain.serve.batcher import ScoreBatcher

        batcher = ScoreBatcher(engine, text, c.batch_wait_ms / 1000)
        return (batcher, rewards.build(batcher, text, name, plan.max_sequence_length),
                "a reward model's scores at POST /v1/rewards")
    from llmtrain.serve.app import build
    from llmtrain.serve.batcher import Batcher
    from llmtrain.serve.openai_api import Server

    engine.warm_up()
    batcher = Batcher(engine, text, c.batch_wait_ms / 1000)
    return (batcher, build(batcher, Server(text, name, plan.max_sequence_length), c.log_requests),
            "OpenAI API under /v1, Megatron-LM's PUT /api")


@contextlib.contextmanager
def listening(app, host: str, port: int, stop: Callable[[], None]):
    """Serve `app` at host:port (port 0: a free one) from a uvicorn thread while the body runs,
    which gets the (host, port) bound; SIGINT and SIGTERM call `stop`."""
    import uvicorn

    sock = _bind(host, port)
    http = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                         timeout_graceful_shutdown=2))
    thread = threading.Thread(target=http.run, kwargs={"sockets": [sock]}, daemon=True,
                              name="http")
    thread.start()
    try:
        while not http.started:
            if not thread.is_alive():
                raise InferenceError("the HTTP server failed to start (its error is above)")
            time.sleep(0.01)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop())
        yield sock.getsockname()[:2]
    finally:
        http.should_exit = True
        thread.join(timeout=5)
        sock.close()


def serve(c: ServeConfig, plan: Plan, engine) -> dict:
    """Driver: answer HTTP requests with `engine` until told to stop; return the metrics."""
    text = Text.load(plan)
    name = c.served_model_name or plan.model.name
    batcher, app, what = _application(c, plan, engine, text, name)
    if c.max_request_bytes:
        from llmtrain.serve.app import BodyLimit

        app = BodyLimit(app, c.max_request_bytes)
    with listening(app, c.host, c.port, batcher.stopping.set) as (host, port):
        print(f"[serve] ready: http://{host}:{port} serves {name} ({what}); batches of up to "
              f"{engine.max_batch_size} sequences, {plan.max_sequence_length} tokens each",
              flush=True)
        batcher.run()
    print(f"[serve] stopped: {batcher.metrics.as_dict()}", file=sys.stderr, flush=True)
    return {"metrics": batcher.metrics.as_dict()}


def execute(c: ServeConfig) -> dict:
    """Serve until stopped; return the metrics."""
    from llmtrain.launch.local import launch

    plan = prepare(c, scores=True)
    Text.load(plan)  # a tokenizer that does not fit stops here, before any process starts
    return launch(plan.cfg, plan.layout, entry=partial(worker.run, plan, partial(serve, c, plan),
                                                 driver_stops=True))
