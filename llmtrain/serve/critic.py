"""`python -m llmtrain.serve.critic`: PPO's critic on ranks of its own, with a layout of its own.

Started with the PPO run's own settings (the same model, data, stage, optim and checkpoint
overrides, and the same run folder) and a `parallel=` and `launcher.nproc_per_node=` of its own;
it listens on every interface at the port of stage.alignment.critic_url (0: a free one, which it
prints). The PPO run with that critic_url then builds no critic on its ranks: each step it asks
this server for the values of its rollouts and has the critic take its optimizer steps on their
returns, and at each of its saves it has the server save (and commit) the critic's step first,
under <run folder>/<checkpoint.save>/critic, as a colocated critic's. The server builds the
critic when the run starts or resumes (POST /v1/critic/setup with the run's step), so a resumed
run gets the critic of its own step.

    POST /v1/critic/setup  {"step": n}                     -> {"step", "layout"}
    POST /v1/critic/values {"rows": [{"tokens", "start"}]} -> {"values": [[...], ...]}
    POST /v1/critic/train  {"rows": [{"tokens", "start", "old_values", "returns"}]}
                                                            -> {"value_loss"}
    POST /v1/critic/save   {"step": n}                     -> {"saved": folder or null}
    GET /health, GET /v1/critic (the layout, and the step of the latest setup or save)

A row's `tokens` are what the critic reads (a rollout's prompt and reply, all but the last
token), `start` the first reply position; values, old values and returns are per position from
`start` on. One request holds every data-parallel replica's rollouts of the step. Commands run one
at a time, in order, on the driver's main thread, which hands each to the other ranks
(llmtrain.megatron.align.critic_service). A malformed request gets a 400, a command the critic
cannot run (not set up, a checkpoint that will not load) a 409 with the reason; the server keeps
serving. SIGINT or SIGTERM stops it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import queue
import signal
import sys
import threading
import warnings
from typing import Optional
from urllib.parse import urlparse

import hydra
from omegaconf import DictConfig
from pydantic import BaseModel

from llmtrain.cli import CONF_DIR, resolve_run
from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config
from llmtrain.config.store import register
from llmtrain.config.validate import ConfigError, validate
from llmtrain.tasks import either, stages_where

register()


def critic_address(cfg: Config) -> int:
    """The port to listen on: stage.alignment.critic_url's (ConfigError when the run has no
    critic to serve)."""
    a = cfg.stage.alignment
    problems = []
    trains_a_critic = stages_where(lambda spec: "critic" in spec.possible_roles)
    if cfg.stage.name not in trains_a_critic:
        problems.append(f"the critic server serves the critic of stage="
                        f"{either(trains_a_critic)}, not stage={cfg.stage.name}: give it the "
                        f"run's settings")
    if not a.critic_url:
        problems.append("stage.alignment.critic_url must be set: the address the PPO run will "
                        "reach this server at (its port is where the server listens)")
    else:
        try:
            port = urlparse(a.critic_url).port
        except ValueError:
            port = None
        if port is None:
            problems.append(f"stage.alignment.critic_url={a.critic_url} names no port: give "
                            f"one, as in http://host:5002")
    if problems:
        raise ConfigError(problems)
    return port


def row_problems(rows: list[dict], train: bool, seq_length: int, vocab_size: int,
                 micro_batch_size: int, replicas: int) -> list[str]:
    """What keeps rows from being run (empty: nothing)."""
    found = []
    per_request = micro_batch_size * replicas
    if not rows or len(rows) % per_request:
        found.append(f"{len(rows)} rows: send a positive multiple of {per_request} (micro batch "
                     f"size {micro_batch_size} x {replicas} data-parallel replica(s) of the "
                     f"critic): the PPO run's stage.global_batch_size, with the same "
                     f"stage.micro_batch_size")
    for i, row in enumerate(rows):
        tokens, start = row["tokens"], row["start"]
        if not 0 < len(tokens) <= seq_length:
            found.append(f"row {i} has {len(tokens)} tokens; 1 to {seq_length} (data.seq_length)")
        elif min(tokens) < 0 or max(tokens) >= vocab_size:
            found.append(f"row {i}: token ids must lie in 0..{vocab_size - 1}")
        elif not 0 <= start < len(tokens):
            found.append(f"row {i}: start={start} must lie in 0..{len(tokens) - 1}")
        elif train and not (row["old_values"] is not None and row["returns"] is not None
                            and len(row["old_values"]) == len(row["returns"])
                            == len(tokens) - start):
            found.append(f"row {i}: train needs old_values and returns for each of its "
                         f"{len(tokens) - start} positions from start")
        elif train and not all(map(math.isfinite, row["old_values"] + row["returns"])):
            found.append(f"row {i}: old_values and returns must be finite")
    return found[:10]


class Row(BaseModel):
    tokens: list[int]
    start: int
    old_values: Optional[list[float]] = None
    returns: Optional[list[float]] = None


class Rows(BaseModel):
    rows: list[Row]


class Step(BaseModel):
    step: int


class Commands:
    """Requests from the HTTP thread, run one at a time on the driver's main thread."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.stopping = threading.Event()

    async def call(self, command: str, payload: dict) -> dict:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.queue.put((command, payload, future))
        return await asyncio.wrap_future(future)

    def run(self, service) -> None:
        from llmtrain.megatron.align.critic_service import CommandError

        while not self.stopping.is_set():
            try:
                command, payload, future = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                future.set_result(service.run(command, payload))
            except CommandError as error:
                future.set_exception(error)


def build(commands: Commands, service):
    """The FastAPI application of a critic service (on its driver)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    from llmtrain.megatron.align.critic_service import CommandError
    from llmtrain.serve.app import openai_error, validation_message
    from llmtrain.serve.openai_api import RequestError

    cfg = service.cfg
    app = FastAPI(title="llmtrain critic", docs_url=None, redoc_url=None)
    state = {"step": None}

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        return openai_error(400, validation_message(error))

    @app.exception_handler(RequestError)
    async def _refused(request: Request, error: RequestError):
        return openai_error(error.status, str(error))

    @app.exception_handler(CommandError)
    async def _failed(request: Request, error: CommandError):
        return openai_error(409, str(error))

    def _ready():
        if state["step"] is None:
            raise RequestError("the critic is not set up: POST /v1/critic/setup {\"step\": n} "
                               "first (the PPO run does when it starts)", status=409)

    async def _rows(command: str, r: Rows, train: bool) -> dict:
        _ready()
        rows = [row.model_dump() for row in r.rows]
        found = row_problems(rows, train, cfg.data.seq_length, cfg.model.vocab_size,
                             cfg.stage.micro_batch_size, service.replicas)
        if found:
            raise RequestError("; ".join(found))
        return await commands.call(command, {"rows": rows})

    @app.post("/v1/critic/setup")
    async def setup(r: Step):
        if r.step < 0:
            raise RequestError(f"step={r.step} must be 0 (a new run) or the run's step")
        answer = await commands.call("setup", {"step": r.step})
        state["step"] = answer["step"]
        return answer

    @app.post("/v1/critic/values")
    async def values(r: Rows):
        return await _rows("values", r, train=False)

    @app.post("/v1/critic/train")
    async def train(r: Rows):
        return await _rows("train", r, train=True)

    @app.post("/v1/critic/save")
    async def save(r: Step):
        _ready()
        if r.step < 1:
            raise RequestError(f"step={r.step} must be at least 1")
        answer = await commands.call("save", {"step": r.step})
        state["step"] = r.step
        return answer

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/critic")
    async def describe():
        return {"model": cfg.model.name, "layout": service.describe(), "step": state["step"]}

    return app


def serve(cfg: Config, service, port: int) -> dict:
    """Driver: answer requests until SIGINT or SIGTERM."""
    from llmtrain.serve.run import listening

    commands = Commands()
    with listening(build(commands, service), "0.0.0.0", port, commands.stopping.set) as (_, port):
        host = urlparse(cfg.stage.alignment.critic_url).hostname
        print(f"[critic] ready: http://{host}:{port} (listening on every interface) serves the "
              f"critic of {cfg.model.name}, {service.describe()}", flush=True)
        commands.run(service)
    print("[critic] stopped", flush=True)
    return {}


def work(port: int, cfg: Config, layout: Layout) -> dict:
    """Every process of the server: the driver serves, the others follow it."""
    from llmtrain.runtime import quiet_libraries

    quiet_libraries()
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
    from llmtrain.data.tokenizer import load_tokenizer
    from llmtrain.megatron import parallel
    from llmtrain.megatron.align.critic_service import CriticService
    from llmtrain.train import run_path

    parallel.initialize(layout, cfg.seed)
    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size)
        save = run_path(cfg, cfg.checkpoint.save)
        talk = parallel.is_logging_rank()

        def say(text: str) -> None:
            if talk:
                print(f"[critic] {text}", flush=True)

        service = CriticService(cfg, layout, tokenizer, save / "critic" if save else None, say)
        if not service.is_driver:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the driver stops the followers
            service.follow()
            return {}
        try:
            return serve(cfg, service, port)
        finally:
            service.stop_followers()
    finally:
        parallel.shutdown()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _main(dcfg: DictConfig) -> None:
    from functools import partial

    from llmtrain.launch import target_machine
    from llmtrain.launch.local import launch
    from llmtrain.runtime import quiet_libraries

    quiet_libraries()
    try:
        cfg = resolve_run(dcfg)
        port = critic_address(cfg)
        layout = validate(cfg, target_machine(cfg), generates=False)
    except ConfigError as error:
        print(f"llmtrain.serve.critic: {error}", file=sys.stderr)
        sys.exit(2)
    launch(cfg, layout, entry=partial(work, port))


def main() -> None:
    # The PPO run writes its own .hydra record in the run folder this server shares.
    sys.argv.append("hydra.output_subdir=null")
    _main()


if __name__ == "__main__":
    main()
