"""OpenAI's `/v1/completions` and `/v1/chat/completions`: requests as pydantic models (a malformed
one is refused with a 400 naming the field), turned into sequences, and the results into OpenAI's
response and stream-chunk objects. Extensions as vLLM names them: top_k, repetition_penalty,
ignore_eos, stop_reason. Fields this server does not know are ignored (the log names them), as
vLLM ignores them: OpenAI-ecosystem clients send fields of their own. Log-probabilities are the
model's own (before temperature and filtering) for every generated token, an end token included
(as `usage` counts it, though the text leaves it out); with `echo` the prompt's come first (None
for its first token), so lm-evaluation-harness's `local-completions` scores log-likelihood
tasks."""

from __future__ import annotations

import time
import uuid
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from llmtrain.generate.sequence import Output, Sampling, Sequence, sampling_problems
from llmtrain.generate.text import Text
from llmtrain.serve.batcher import Choice

MAX_LOGPROBS = 20


class RequestError(ValueError):
    """A request that cannot run: HTTP `status` with a message that says why."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.param = param


class _Request(BaseModel):
    """Fields both APIs share. Unknown fields are kept aside (`ignored`), not refused."""

    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    n: int = Field(1, ge=1, le=32)
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[int] = Field(None, ge=-2 ** 63, lt=2 ** 63)  # a 64-bit integer, as vLLM's
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict] = None
    user: Optional[str] = None
    # Extensions (vLLM's names).
    top_k: Optional[int] = Field(None, ge=-1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    ignore_eos: bool = False

    def sampling(self, vocab_size: int) -> Sampling:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise RequestError(f"{name} is not supported: use repetition_penalty",
                                   param=name)
        if self.logit_bias:
            raise RequestError("logit_bias is not supported", param="logit_bias")
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = self.top_p if self.top_p is not None and self.top_p < 1 else 0.0
        top_k = self.top_k if self.top_k and self.top_k > 0 else 0
        sampling = Sampling(temperature, top_k, top_p, self.repetition_penalty or 1.0,
                            self.seed)
        problems = sampling_problems(sampling, vocab_size)
        if problems:
            raise RequestError("; ".join(problems))
        return sampling

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise RequestError("stop takes up to 4 non-empty strings", param="stop")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def ignored(self) -> list[str]:
        """The fields of the request (and of its messages) this server does not know."""
        names = list(self.model_extra or {})
        for i, message in enumerate(getattr(self, "messages", None) or []):
            names += [f"messages[{i}].{key}" for key in message.model_extra or {}]
        return names


class CompletionRequest(_Request):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    # developer: OpenAI's newer name for the system role
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart]]
    name: Optional[str] = None

    def plain(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role,
                "content": content}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)


class Server:
    """What request handling needs to know about the served model."""

    def __init__(self, text: Text, name: str, max_sequence_length: int):
        self.text = text
        self.name = name
        self.max_sequence_length = max_sequence_length

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.name:
            raise RequestError(f"The model `{model}` does not exist: this server serves "
                               f"`{self.name}`", status=404, param="model")

    def fits(self, prompt: list[int], new: Optional[int]) -> int:
        """Tokens to generate: `new`, or as many as the context leaves; refuse what does not
        fit (OpenAI's wording)."""
        if not prompt:
            raise RequestError("the prompt is empty: give at least one token", param="prompt")
        if max(prompt) >= self.text.vocab_size or min(prompt) < 0:
            raise RequestError(f"prompt token ids must lie in 0..{self.text.vocab_size - 1}",
                               param="prompt")
        room = self.max_sequence_length - len(prompt)
        if new is None:
            new = room
            if room < 1:
                raise RequestError(f"the prompt has {len(prompt)} tokens: it leaves no room to "
                                   f"answer in this model's {self.max_sequence_length}-token "
                                   f"context", param="messages")
        if new > room or room < 0:
            raise RequestError(f"This model's maximum context length is "
                               f"{self.max_sequence_length} tokens. However, you requested "
                               f"{len(prompt) + new} tokens ({len(prompt)} in the prompt, {new} "
                               f"for the completion). Please reduce the prompt or the "
                               f"completion length.")
        return new

    def sequence(self, request: _Request, prompt: list[int], new: Optional[int],
                 logprobs: Optional[int], prompt_logprobs: bool, sampling: Sampling,
                 seed_offset: int) -> Sequence:
        if sampling.seed is not None and seed_offset:
            sampling = Sampling(sampling.temperature, sampling.top_k, sampling.top_p,
                                sampling.repetition_penalty, sampling.seed + seed_offset)
        return Sequence(prompt, self.fits(prompt, new), sampling,
                        () if request.ignore_eos else self.text.stop_ids, logprobs,
                        prompt_logprobs)

    # Completions -------------------------------------------------------------------------

    def completion_choices(self, r: CompletionRequest) -> tuple[list[Choice], list[list[int]]]:
        """The choices of a completion request (n per prompt) and the prompts' tokens."""
        self.check_model(r.model)
        if r.suffix is not None:
            raise RequestError("suffix is not supported", param="suffix")
        if r.best_of not in (None, r.n):
            raise RequestError("best_of is not supported (leave it out, or equal to n)",
                               param="best_of")
        if r.stream and r.echo and r.logprobs is not None:
            raise RequestError("echo with logprobs is not supported when streaming",
                               param="echo")
        prompt = r.prompt
        if isinstance(prompt, str):
            prompts = [self.text.encode(prompt)]
        elif prompt and isinstance(prompt[0], str):
            prompts = [self.text.encode(p) for p in prompt]
        elif prompt and isinstance(prompt[0], int):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        if not prompts:
            raise RequestError("prompt is empty", param="prompt")
        sampling = r.sampling(self.text.vocab_size)
        stops = r.stops()
        choices = []
        for i, ids in enumerate(prompts):
            for j in range(r.n):
                seq = self.sequence(r, ids, r.max_tokens, r.logprobs,
                                    r.echo and r.logprobs is not None, sampling, j)
                choices.append(Choice(seq, i * r.n + j, stops, watch=bool(stops) or r.stream))
        return choices, prompts

    def _completion_logprobs(self, tokens: list[int], logprobs: list, tops: list,
                             start: int = 0) -> dict:
        pieces = [self.text.piece(t) for t in tokens]
        offsets, at = [], start
        for piece in pieces:
            offsets.append(at)
            at += len(piece)
        top = [None if t is None else {**{self.text.piece(i): v for i, v in t}, piece: lp}
               for t, piece, lp in zip(tops, pieces, logprobs)]
        return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": top,
                "text_offset": offsets}

    def completion_choice(self, r: CompletionRequest, choice: Choice, output: Output,
                          text: str, prompt_text: str) -> dict:
        logprobs = None
        if r.logprobs is not None:
            tokens = list(output.tokens)
            values = list(output.logprobs)
            tops = list(output.top_logprobs)
            if r.echo:
                tokens = choice.sequence.prompt + tokens
                values = output.prompt_logprobs + values
                tops = output.prompt_top_logprobs + tops
            logprobs = self._completion_logprobs(tokens, values, tops)
        return {"index": choice.index, "text": (prompt_text if r.echo else "") + text,
                "logprobs": logprobs, "finish_reason": output.finish_reason,
                "stop_reason": choice.stop_reason}

    def prompt_text(self, r: CompletionRequest, index: int, prompt: list[int]) -> str:
        if isinstance(r.prompt, str):
            return r.prompt
        if r.prompt and isinstance(r.prompt[0], str):
            return r.prompt[index]
        return self.text.decode(prompt)

    def token_logprobs(self, output_token: int, logprob: Optional[float],
                       top: Optional[list]) -> Optional[dict]:
        """One streamed token's logprobs (completions format)."""
        if logprob is None:
            return None
        return self._completion_logprobs([output_token], [logprob], [top])

    # Chat -------------------------------------------------------------------------------

    def chat_choices(self, r: ChatRequest) -> tuple[list[Choice], list[int]]:
        self.check_model(r.model)
        if r.top_logprobs is not None and not r.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", param="top_logprobs")
        from llmtrain.generate.plan import InferenceError

        try:
            prompt = self.text.chat([m.plain() for m in r.messages])
        except InferenceError as error:
            raise RequestError(str(error), param="messages") from None
        sampling = r.sampling(self.text.vocab_size)
        stops = r.stops()
        logprobs = (r.top_logprobs or 0) if r.logprobs else None
        new = r.max_completion_tokens or r.max_tokens
        choices = [Choice(self.sequence(r, prompt, new, logprobs, False, sampling, j), j, stops,
                          watch=bool(stops) or r.stream) for j in range(r.n)]
        return choices, prompt

    def _chat_token(self, token: int, logprob: float, top: Optional[list]) -> dict:
        piece = self.text.piece(token)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode()),
                "top_logprobs": [{"token": self.text.piece(i), "logprob": v,
                                  "bytes": list(self.text.piece(i).encode())}
                                 for i, v in (top or [])]}

    def chat_logprobs(self, r: ChatRequest, tokens: list[int], logprobs: list, tops: list
                      ) -> Optional[dict]:
        if not r.logprobs:
            return None
        return {"content": [self._chat_token(t, lp, top)
                            for t, lp, top in zip(tokens, logprobs, tops)]}

    def chat_choice(self, r: ChatRequest, choice: Choice, output: Output, text: str) -> dict:
        return {"index": choice.index, "message": {"role": "assistant", "content": text},
                "logprobs": self.chat_logprobs(r, output.tokens, output.logprobs or [],
                                               output.top_logprobs or []),
                "finish_reason": output.finish_reason, "stop_reason": choice.stop_reason}


def envelope(kind: str, model: str, request_id: str, **content) -> dict:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model,
            **content}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
