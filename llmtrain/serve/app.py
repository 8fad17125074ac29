"""The HTTP side of the server (FastAPI on uvicorn, in its own thread): parse and check each
request, queue it for the batcher, answer when its sequences are done or stream them token by
token (server-sent events, as OpenAI's API does). A malformed request is answered with a 4xx that
says what is wrong; nothing it does stops the server.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models and
/v1/models/{id} (OpenAI); PUT /api (Megatron-LM); GET /tokenizer_info, POST /tokenize, POST
/detokenize (as vLLM has them: what lm-evaluation-harness's remote tokenizer uses); GET /health;
GET /metrics (requests, batches and their sizes, in Prometheus' text format; ?format=json as
JSON).

One client's request never touches another's: text that is not valid Unicode is refused with a
400 before it reaches the tokenizer, a body over `max_request_bytes` with a 413 before it is
read, and tokenization runs off the event loop, so a large prompt does not hold the others.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from llmtrain.serve import megatron_api
from llmtrain.serve.batcher import Batcher, Choice, Work
from llmtrain.serve.openai_api import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    Server,
    envelope,
    new_id,
    usage,
)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets a 413 (JSON parsing a huge body
    would hold the event loop for every client): by its Content-Length before it is read, and a
    chunked one without a length as soon as what has arrived passes the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _refusal(self, size: str) -> str:
        return (f"the request body is {size} bytes, over this server's limit of {self.limit} "
                f"(max_request_bytes): send less per request, or start the server with a "
                f"larger max_request_bytes")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and int(length) > self.limit:
            return await openai_error(413, self._refusal(str(int(length))))(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # FastAPI passes an HTTPException from here on
                raise HTTPException(413, self._refusal(f"over {received}"))
            return message

        return await self.app(scope, counted, send)


def unicode_problem(value, where: str = "") -> Optional[str]:
    """Where a request's JSON holds text that is not valid Unicode (a lone surrogate, which
    JSON's \\u escapes can carry), in words; None if nowhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return (f"{where or 'the request'} holds text that is not valid Unicode (a lone "
                    f"surrogate, {value[error.start]!r}, at character {error.start}): send "
                    f"valid UTF-8 text")
    elif isinstance(value, dict):
        for key, item in value.items():
            found = unicode_problem(item, f"{where}.{key}" if where else str(key))
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = unicode_problem(item, f"{where}[{i}]")
            if found:
                return found
    return None


def metrics_text(metrics: dict) -> str:
    """The server's counters in Prometheus' text format (what vLLM's /metrics serves)."""
    lines = []
    for key, value in metrics.items():
        if key == "batch_sizes":
            lines.append("# TYPE llmtrain_batches_of_size counter")
            lines += [f'llmtrain_batches_of_size{{size="{size}"}} {count}'
                      for size, count in value.items()]
        else:
            kind = "gauge" if key == "max_batch_size" else "counter"
            lines += [f"# TYPE llmtrain_{key} {kind}", f"llmtrain_{key} {value}"]
    return "\n".join(lines) + "\n"


def openai_error(status: int, message: str, param=None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": None}}, status_code=status)


def validation_message(error: RequestValidationError) -> str:
    """Pydantic's errors as one line per field; a value that fits none of a field's types names
    them all at once."""
    fields: dict = {}
    for e in error.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        fields.setdefault(loc[0] if loc else "", []).append((loc[1:], e.get("msg", "")))
    parts = []
    for name, errors in fields.items():
        branches = list(dict.fromkeys(loc[0] for loc, _ in errors if loc))
        if len(errors) > 1 and len(branches) == len(errors):
            parts.append(f"{name}: expected one of: {', '.join(branches)}")
        elif name == "":
            parts.append(errors[0][1])
        else:
            parts += [f"{'.'.join([name, *loc])}: {msg}" for loc, msg in errors]
    return "; ".join(parts) or "malformed request"


def submit(batcher: Batcher, choices: list[Choice], stream: bool) -> Work:
    work = Work(choices, asyncio.get_running_loop(), asyncio.Queue(), stream)
    batcher.submit(work)
    return work


async def results(work: Work) -> dict:
    """{choice index: (Output, text)} once every choice is done."""
    done = {}
    try:
        while len(done) < len(work.choices):
            event = await work.events.get()
            if event[0] == "error":
                raise RuntimeError(event[1])
            if event[0] == "done":
                done[event[1]] = (event[2], event[3])
    finally:
        work.cancelled = len(done) < len(work.choices)  # a client gone: stop its sequences
    return done


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def application(batcher: Batcher, name: str, max_sequence_length: int, work: str,
                **model) -> FastAPI:
    """What every llmtrain server answers: errors in OpenAI's format (Megatron-LM's on PUT
    /api; a 500 says that `work` failed), /health, /metrics, and /v1/models with `model`'s
    fields."""
    app = FastAPI(title="llmtrain", docs_url=None, redoc_url=None)

    def refuse(request: Request, status: int, message: str, param=None) -> JSONResponse:
        """A 4xx in the format of the endpoint's API (Megatron-LM's on /api)."""
        if request.url.path == "/api":
            return JSONResponse({"message": message}, status_code=status)
        return openai_error(status, message, param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError):
        return refuse(request, 400, validation_message(error))

    @app.exception_handler(RequestError)
    async def _refused(request: Request, error: RequestError):
        return refuse(request, error.status, str(error), error.param)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, error: HTTPException):  # a body that is not UTF-8, say
        return refuse(request, error.status_code, str(error.detail))

    @app.exception_handler(RuntimeError)
    async def _failed(request: Request, error: RuntimeError):
        return openai_error(500, f"{work} failed: {error}")

    @app.exception_handler(Exception)
    async def _crashed(request: Request, error: Exception):  # a bug: say it in JSON, too
        return openai_error(500, f"{work} failed: {type(error).__name__}: {error}")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(format: str = "prometheus"):
        counters = batcher.metrics.as_dict()
        return counters if format == "json" else PlainTextResponse(metrics_text(counters))

    def card() -> dict:
        return {"id": name, "object": "model", "created": int(time.time()),
                "owned_by": "llmtrain", "max_model_len": max_sequence_length, **model}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str):
        if model_id != name:
            raise RequestError(f"The model `{model_id}` does not exist: this server serves "
                               f"`{name}`", status=404, param="model")
        return card()

    return app


def build(batcher: Batcher, server: Server, log_requests: bool = False) -> FastAPI:
    """The FastAPI application of a batcher."""
    app = application(batcher, server.name, server.max_sequence_length, "generation")
    text = server.text

    def _note(r, path: str) -> None:
        """Log the request (log_requests) and the fields it holds that are ignored; refuse text
        that is not valid Unicode."""
        problem = unicode_problem(r.model_dump())
        if problem:
            raise RequestError(problem)
        if log_requests:
            print(f"[serve] {r.model_dump_json(exclude_unset=True)[:2000]}", file=sys.stderr,
                  flush=True)
        if r.ignored():
            print(f"[serve] {path}: ignored the field(s) this server does not know: "
                  f"{', '.join(r.ignored())}", file=sys.stderr, flush=True)

    @app.post("/v1/completions")
    async def completions(r: CompletionRequest):
        _note(r, "/v1/completions")
        # Tokenizing off the event loop: a long prompt does not hold the other clients.
        choices, prompts = await asyncio.to_thread(server.completion_choices, r)
        texts = [server.prompt_text(r, i, p) for i, p in enumerate(prompts)]
        work = submit(batcher, choices, r.stream)
        request_id = new_id("cmpl")
        prompt_tokens = sum(len(p) for p in prompts)
        if r.stream:
            return StreamingResponse(_stream_completion(work, r, texts, request_id,
                                                        prompt_tokens),
                                     media_type="text/event-stream")
        done = await results(work)
        out = [server.completion_choice(r, c, *done[c.index], texts[c.index // r.n])
               for c in choices]
        made = sum(len(done[c.index][0].tokens) for c in choices)
        return envelope("text_completion", server.name, request_id, choices=out,
                        usage=usage(prompt_tokens, made))

    async def _stream(work: Work, opening: list[str], on_token, on_finish,
                      closing) -> AsyncIterator[str]:
        """Server-sent events of a streamed request: `opening` chunks, then each generated
        token's and each finished choice's chunks, then `closing(tokens made)` (or None)."""
        made, finished = 0, 0
        try:
            for line in opening:
                yield line
            while finished < len(work.choices):
                event = await work.events.get()
                if event[0] == "error":
                    yield _sse({"error": {"message": event[1], "type": "server_error"}})
                    return
                if event[0] == "token":
                    made += 1
                    for line in on_token(*event[1:]):
                        yield line
                else:
                    finished += 1
                    for line in on_finish(*event[1:]):
                        yield line
            if closing:
                yield closing(made)
            yield "data: [DONE]\n\n"
        finally:
            work.cancelled = finished < len(work.choices)

    def _stream_completion(work: Work, r: CompletionRequest, texts: list[str],
                           request_id: str, prompt_tokens: int) -> AsyncIterator[str]:
        def chunk(index, delta, logprobs=None, finish=None):
            return _sse(envelope("text_completion", server.name, request_id, choices=[{
                "index": index, "text": delta, "logprobs": logprobs,
                "finish_reason": finish}]))

        def on_token(index, token, logprob, top, delta):
            if delta or r.logprobs is not None:
                yield chunk(index, delta, server.token_logprobs(token, logprob, top)
                            if r.logprobs is not None else None)

        def on_finish(index, output, rest):
            yield chunk(index, rest, None, output.finish_reason)

        opening = [chunk(c.index, texts[c.index // r.n]) for c in work.choices] if r.echo else []
        closing = (lambda made: _sse(envelope("text_completion", server.name, request_id,
                                              choices=[], usage=usage(prompt_tokens, made)))
                   ) if r.include_usage else None
        return _stream(work, opening, on_token, on_finish, closing)

    @app.post("/v1/chat/completions")
    async def chat(r: ChatRequest):
        _note(r, "/v1/chat/completions")
        choices, prompt = await asyncio.to_thread(server.chat_choices, r)
        work = submit(batcher, choices, r.stream)
        request_id = new_id("chatcmpl")
        if r.stream:
            return StreamingResponse(_stream_chat(work, r, request_id, len(prompt)),
                                     media_type="text/event-stream")
        done = await results(work)
        out = [server.chat_choice(r, c, *done[c.index]) for c in choices]
        made = sum(len(done[c.index][0].tokens) for c in choices)
        return envelope("chat.completion", server.name, request_id, choices=out,
                        usage=usage(len(prompt), made))

    def _stream_chat(work: Work, r: ChatRequest, request_id: str, prompt_tokens: int
                     ) -> AsyncIterator[str]:
        def chunk(index, delta, logprobs=None, finish=None):
            return _sse(envelope("chat.completion.chunk", server.name, request_id, choices=[{
                "index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": finish}]))

        def on_token(index, token, logprob, top, delta):
            if delta or r.logprobs:
                yield chunk(index, {"content": delta},
                            server.chat_logprobs(r, [token], [logprob], [top]))

        def on_finish(index, output, rest):
            if rest:
                yield chunk(index, {"content": rest})
            yield chunk(index, {}, None, output.finish_reason)

        opening = [chunk(c.index, {"role": "assistant", "content": ""}) for c in work.choices]
        closing = (lambda made: _sse(envelope("chat.completion.chunk", server.name, request_id,
                                              choices=[], usage=usage(prompt_tokens, made)))
                   ) if r.include_usage else None
        return _stream(work, opening, on_token, on_finish, closing)

    @app.put("/api")
    async def megatron(request: Request):
        try:
            body = await request.json()
        except ValueError:
            raise RequestError("the request body is not JSON") from None
        problem = unicode_problem(body)
        if problem:
            raise RequestError(problem)
        choices, options = await asyncio.to_thread(megatron_api.parse, body, server)
        if not options["no_log"]:
            print(f"[serve] /api request from {request.client.host if request.client else '?'}"
                  f": {len(choices)} prompt(s)", file=sys.stderr, flush=True)
        done = await results(submit(batcher, choices, False))
        return megatron_api.response(body["prompts"], choices, done, server,
                                     options["logprobs"])

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        eod = text.piece(text.tokenizer.eod)
        return {"tokenizer_class": f"llmtrain ({text.tokenizer.kind})",
                "eos_token": text.special("eos_token") or eod,
                "bos_token": text.special("bos_token"), "pad_token": text.special("pad_token"),
                "chat_template": text.chat_template,
                "model_max_length": server.max_sequence_length}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _json(request)
        if isinstance(body.get("prompt"), str):
            tokens = text.encode(body["prompt"])
            if body.get("add_special_tokens") and text.bos is not None:
                tokens = [text.bos] + tokens
        elif "messages" in body:
            from llmtrain.generate.plan import InferenceError

            try:
                tokens = text.chat(body["messages"])
            except InferenceError as error:
                raise RequestError(str(error), param="messages") from None
        else:
            raise RequestError("tokenize takes {\"prompt\": text} or {\"messages\": [...]}")
        return {"tokens": tokens, "count": len(tokens),
                "max_model_len": server.max_sequence_length}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _json(request)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and 0 <= t < text.vocab_size for t in tokens):
            raise RequestError(f"detokenize takes {{\"tokens\": [ids in 0.."
                               f"{text.vocab_size - 1}]}}", param="tokens")
        return {"prompt": text.decode(tokens)}

    return app


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        raise RequestError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    problem = unicode_problem(body)
    if problem:
        raise RequestError(problem)
    return body
