"""The HTTP side of a served reward model (`python -m llmtrain.serve load=<a stage=rm
checkpoint>`): the request of stage.alignment.reward=remote (llmtrain.rlhf.remote), so that GRPO
and PPO can score on other GPUs or machines with a reward model llmtrain trained.

    POST /v1/rewards
    {"prompts": [text, ...], "replies": [text, ...], "answers": [...] (ignored),
     "token_ids": [[id, ...], ...] (optional)}
    -> {"rewards": [number, ...], "model": name}

A sequence is `token_ids` when given (what llmtrain's GRPO and PPO send: the rollout's prompt and
reply without its last token, the tokens a reward model reads), else the prompt's tokens then the
reply's. Its reward is the model's score at its last position, where stage=rm trains it: the
position that predicts the reply's end token.

Also GET /health, /metrics and /v1/models. Malformed requests get a 400 that says what is wrong.
"""

from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from pydantic import BaseModel

from llmtrain.generate.text import Text
from llmtrain.serve.app import application, results, submit
from llmtrain.serve.batcher import ScoreBatcher, Scored
from llmtrain.serve.openai_api import RequestError


class RewardRequest(BaseModel):
    prompts: list[str]
    replies: list[str]
    answers: Optional[list[Optional[str]]] = None
    token_ids: Optional[list[list[int]]] = None


def sequences(r: RewardRequest, text: Text, problems) -> list[list[int]]:
    """The token ids each reward is read from (RequestError with every problem found)."""
    found = []
    if len(r.replies) != len(r.prompts):
        found.append(f"{len(r.prompts)} prompts but {len(r.replies)} replies: give one reply "
                     f"per prompt")
    if r.token_ids is not None and len(r.token_ids) != len(r.replies):
        found.append(f"{len(r.token_ids)} token_ids lists for {len(r.replies)} replies: give one "
                     f"per reply, or none")
    if not r.replies:
        found.append("no replies to score")
    if found:
        raise RequestError("; ".join(found))
    ids = r.token_ids if r.token_ids is not None else [
        text.encode(p) + text.encode(reply) for p, reply in zip(r.prompts, r.replies)]
    found = problems(ids)
    if found:
        raise RequestError("; ".join(found), param="token_ids" if r.token_ids else "replies")
    return ids


def build(batcher: ScoreBatcher, text: Text, name: str, max_sequence_length: int) -> FastAPI:
    """The FastAPI application of a reward model's batcher."""
    app = application(batcher, name, max_sequence_length, "scoring", kind="reward model")

    @app.post("/v1/rewards")
    async def rewards(r: RewardRequest):
        ids = sequences(r, text, batcher.engine.problems)
        work = submit(batcher, [Scored(seq, i) for i, seq in enumerate(ids)], False)
        done = await results(work)
        return {"rewards": [done[i][0] for i in range(len(ids))], "model": name}

    return app
