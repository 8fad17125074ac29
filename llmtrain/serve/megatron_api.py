"""Megatron-LM's REST interface, `PUT /api`, as its text generation server answers it (and its
tools/text_generation_cli.py and other clients expect): the same fields, defaults and refusals
(HTTP 400 with {"message": ...}). The response has the prompts with their generations ("text"),
the tokens of both ("tokens", with "segments": the tokens as text) and, with logprobs=true,
the log-probability of every token after the first ("logprobs")."""

from __future__ import annotations

from llmtrain.generate.sequence import Output, Sampling, Sequence
from llmtrain.serve.batcher import Choice
from llmtrain.serve.openai_api import RequestError, Server

MAX_PROMPTS = 128


def _field(body: dict, name: str, default, check, message: str):
    if name not in body:
        return default
    value = body[name]
    if not check(value):
        raise RequestError(message)
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse(body, server: Server) -> tuple[list[Choice], dict]:
    """The choices of a /api request, and its options; RequestError with Megatron-LM's message
    when a field is wrong."""
    if not isinstance(body, dict) or "prompts" not in body:
        raise RequestError("prompts argument required")
    if "max_len" in body:
        raise RequestError("max_len is no longer used.  Replace with tokens_to_generate")
    if "sentences" in body:
        raise RequestError("sentences is no longer used.  Replace with prompts")
    prompts = body["prompts"]
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("prompts is not a list of strings")
    if not prompts:
        raise RequestError("prompts is empty")
    if len(prompts) > MAX_PROMPTS:
        raise RequestError(f"Maximum number of prompts is {MAX_PROMPTS}")
    new = _field(body, "tokens_to_generate", 64, lambda v: _is_int(v) and v >= 0,
                 "tokens_to_generate must be an integer greater than or equal to 0")
    logprobs = _field(body, "logprobs", False, lambda v: isinstance(v, bool),
                      "logprobs must be a boolean value")
    if new == 0 and not logprobs:
        raise RequestError("tokens_to_generate=0 implies logprobs should be True")
    temperature = _field(body, "temperature", 1.0, lambda v: _is_number(v) and 0 < v <= 100,
                         "temperature must be a positive number less than or equal to 100.0")
    top_k = _field(body, "top_k", 0, lambda v: _is_int(v) and 0 <= v <= 1000,
                   "top_k must be an integer equal to or greater than 0 and less than or "
                   "equal to 1000")
    top_p = _field(body, "top_p", 0.0, lambda v: _is_number(v) and 0 <= v <= 1,
                   "top_p must be a positive float less than or equal to 1.0")
    if top_p > 0 and top_k > 0:
        raise RequestError("cannot set both top-k and top-p samplings.")
    add_bos = _field(body, "add_BOS", False, lambda v: isinstance(v, bool),
                     "add_BOS must be a boolean value")
    if any(not p for p in prompts) and not add_bos:
        raise RequestError("Empty prompts require add_BOS=true")
    stops = []
    for name, stop in (("stop_on_eol", "\n"), ("stop_on_double_eol", "\n\n")):
        if _field(body, name, False, lambda v: isinstance(v, bool),
                  f"{name} must be a boolean value"):
            stops.append(stop)
    seed = _field(body, "random_seed", -1, _is_int, "random_seed must be integer")
    if seed < -1:
        raise RequestError("random_seed must be a positive integer")
    stop_token = _field(body, "stop_token", None, _is_int, "stop_token must be an integer")
    penalty = _field(body, "repetition_penalty", 1.0, lambda v: _is_number(v) and v > 0,
                     "repetition_penalty must be a positive number")
    no_log = _field(body, "no_log", False, lambda v: isinstance(v, bool),
                    "no_log must be a boolean value")
    if body.get("beam_width") is not None:
        raise RequestError("beam_width: beam search is not supported by this server")
    if _field(body, "prevent_newline_after_colon", False, lambda v: isinstance(v, bool),
              "prevent_newline_after_colon must be a boolean value"):
        raise RequestError("prevent_newline_after_colon is not supported by this server")
    known = {"prompts", "tokens_to_generate", "logprobs", "temperature", "top_k", "top_p",
             "add_BOS", "stop_on_eol", "stop_on_double_eol", "random_seed", "stop_token",
             "repetition_penalty", "no_log", "beam_width", "prevent_newline_after_colon",
             "length_penalty", "top_p_decay", "top_p_bound"}
    unknown = sorted(set(body) - known)
    if unknown:
        raise RequestError(f"unknown field(s): {', '.join(unknown)}")

    text = server.text
    bos = text.bos
    if add_bos and bos is None:
        raise RequestError("add_BOS=true, but the tokenizer has no BOS token")
    sampling = Sampling(temperature, top_k, float(top_p), penalty,
                        None if seed < 0 else seed)
    stop_ids = text.stop_ids if stop_token is None else (stop_token,)
    choices = []
    for i, prompt in enumerate(prompts):
        ids = ([bos] if add_bos else []) + text.encode(prompt)
        seq = Sequence(ids, server.fits(ids, new), sampling, stop_ids,
                       0 if logprobs else None, logprobs)
        choices.append(Choice(seq, i, tuple(stops), watch=bool(stops)))
    return choices, {"logprobs": logprobs, "no_log": no_log}


def response(prompts: list[str], choices: list[Choice], outputs: dict, server: Server,
             logprobs: bool) -> dict:
    """Megatron-LM's answer: prompt + generation per prompt, in order."""
    text, tokens, segments, values = [], [], [], []
    for prompt, choice in zip(prompts, choices):
        output, generated = outputs[choice.index]
        ids = choice.sequence.prompt + output.visible(choice.sequence.stop_ids)
        text.append(prompt + generated)
        tokens.append(ids)
        segments.append([server.text.piece(t) for t in ids])
        if logprobs:
            values.append(_logprobs(output, choice))
    answer = {"text": text, "segments": segments, "tokens": tokens}
    if logprobs:
        answer["logprobs"] = values
    return answer


def _logprobs(output: Output, choice: Choice) -> list[float]:
    shown = len(output.visible(choice.sequence.stop_ids))
    return list(output.prompt_logprobs[1:]) + list(output.logprobs[:shown])
