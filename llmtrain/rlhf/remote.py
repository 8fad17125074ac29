"""Roles on servers of their own: the reward (stage.alignment.reward=remote), the reference
policy (stage.alignment.reference_url) and PPO's critic (stage.alignment.critic_url), so that
they run on other GPUs or machines than the policy.

Rewards come from a server of the user's: a verifier, a code sandbox, a judge or a reward
model. The request, one per replica and step, lists every rollout of the replica:

    POST <stage.alignment.reward_url>
    {"prompts": [text, ...], "replies": [text, ...], "answers": [text or null, ...],
     "token_ids": [[id, ...], ...]}

(a prompt as the chat template rendered it, the reply without the token that ended it, the
record's "answer", and the token ids a reward model of the policy's tokenizer reads: the
prompt's and the reply's but the last). The server answers {"rewards": [number, ...]}, one per
rollout, in order. `python -m llmtrain.serve` of a stage=rm checkpoint is such a server
(POST /v1/rewards).

The reference's log-probabilities come from `python -m llmtrain.serve load=<the reference>`
(or another server of OpenAI's completions API that takes `max_tokens` 0 and echoes prompt
log-probabilities): every rollout's tokens as a prompt, `max_tokens` 0, `echo` and `logprobs` 0.

Connection failures, timeouts and 5xx answers are tried again (RETRIES times, 1 s and 2 s
apart); anything else stops the run with what the server said.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from typing import Optional

RETRIES = 2


class RoleServerError(RuntimeError):
    pass


def _excerpt(data: bytes | str, limit: int = 200) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text if len(text) <= limit else text[:limit] + "..."


def _post(url: str, body: bytes, timeout: float) -> bytes:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _ask(role: str, url: str, setting: str, payload: dict, timeout: float,
         tries: int = RETRIES + 1) -> bytes:
    """The server's answer to one POST, tried again after transient failures."""
    body = json.dumps(payload).encode()
    failure = None
    for attempt in range(tries):
        if attempt:
            time.sleep(attempt)
        try:
            return _post(url, body, timeout)
        except urllib.error.HTTPError as error:
            if error.code < 500:
                raise RoleServerError(f"the {role} server at {url} refused the request: HTTP "
                                      f"{error.code}: {_excerpt(error.read())}") from None
            failure = f"HTTP {error.code}"
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            failure = str(getattr(error, "reason", error))
    raise RoleServerError(f"the {role} server at {url} did not answer ({failure}) in "
                          f"{tries} tr{'ies' if tries > 1 else 'y'}: start it, or fix "
                          f"stage.alignment.{setting}")


def remote_rewards(url: str, prompts: list[str], replies: list[str],
                   answers: list[Optional[str]], timeout: float,
                   token_ids: Optional[list[list[int]]] = None) -> list[float]:
    """The server's reward of each rollout (RoleServerError says what went wrong)."""
    payload = {"prompts": prompts, "replies": replies,
               "answers": [None if a is None else str(a) for a in answers]}
    if token_ids is not None:
        payload["token_ids"] = token_ids
    data = _ask("reward", url, "reward_url", payload, timeout)
    expected = f'{{"rewards": [{len(replies)} numbers]}}'
    try:
        rewards = json.loads(data)["rewards"]
        values = [float(r) for r in rewards]
    except (ValueError, TypeError, KeyError):
        raise RoleServerError(f"the reward server at {url} answered {_excerpt(data)}; "
                              f"expected {expected}") from None
    if len(values) != len(replies) or not all(math.isfinite(v) for v in values):
        raise RoleServerError(f"the reward server at {url} answered {len(values)} reward(s) "
                              f"({_excerpt(json.dumps(rewards))}); expected {expected}, "
                              f"all finite")
    return values


def remote_logprobs(url: str, sequences: list[list[int]], timeout: float) -> list[list[float]]:
    """log p(token | the tokens before it) of every token but the first of each sequence, from
    a completions server of the reference."""
    url = f"{url.rstrip('/')}/v1/completions"
    data = _ask("reference", url, "reference_url", {
        "prompt": sequences, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 0.0},
        timeout)
    try:
        choices = sorted(json.loads(data)["choices"], key=lambda c: c["index"])
        values = [[float(v) for v in c["logprobs"]["token_logprobs"][1:len(seq)]]
                  for c, seq in zip(choices, sequences)]
    except (ValueError, TypeError, KeyError):
        raise RoleServerError(f"the reference server at {url} answered {_excerpt(data)}; "
                              f"expected OpenAI completions with echoed prompt logprobs") from None
    if len(values) != len(sequences) or any(len(v) != len(s) - 1
                                            for v, s in zip(values, sequences)):
        raise RoleServerError(f"the reference server at {url} answered log-probabilities for "
                              f"{len(values)} of {len(sequences)} sequences, or not for every "
                              f"token: is it an OpenAI completions server?")
    return values


def critic_request(url: str, command: str, payload: dict, timeout: float) -> dict:
    """The answer of a critic server (`python -m llmtrain.serve.critic`) to one command: setup,
    values, train or save. A train request is sent once: one that timed out may have taken its
    optimizer step."""
    url = f"{url.rstrip('/')}/v1/critic/{command}"
    data = _ask("critic", url, "critic_url", payload, timeout,
                tries=1 if command == "train" else RETRIES + 1)
    try:
        answer = json.loads(data)
        if not isinstance(answer, dict):
            raise TypeError
        return answer
    except (ValueError, TypeError):
        raise RoleServerError(f"the critic server at {url} answered {_excerpt(data)}; expected "
                              f"a JSON object: is it python -m llmtrain.serve.critic?") from None
