"""Preference and prompt records, read like the SFT sources (json/jsonl/parquet through
llmtrain.data.sources) and turned into tokens with the same chat templates (llmtrain.data.chat).

- preference (stage=rm, dpo): {"prompt", "chosen", "rejected"}; the prompt is text (one user
  turn) or a list of role/content messages, each reply text or messages whose last assistant
  turn is the reply; an optional "system".
- prompts (stage=grpo, ppo): {"prompt", "answer"}; the answer (optional) is what the
  exact_match and math rules compare the reply's answer with (the code rule: its tests).

`arithmetic` in data.data_path stands for a generated set of small sums (both kinds), so that
every stage runs as it is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from llmtrain.data import chat
from llmtrain.data.sources import DataError, chunks, parse_chunk
from llmtrain.data.tokenizer import Tokenizer

ARITHMETIC = "arithmetic"


def arithmetic(count: int = 2000, seed: int = 0) -> list[dict]:
    """Small sums: the question, its answer, and a preference pair (right answer over a near
    miss)."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        records.append({"prompt": f"What is {a} + {b}? Answer with the number.",
                        "answer": str(a + b), "chosen": str(a + b), "rejected": str(wrong)})
    return records


def read(entries: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(where, record) of every source in data.data_path."""
    files = [e for e in entries if e != ARITHMETIC]
    for entry in entries:
        if entry == ARITHMETIC:
            for number, record in enumerate(arithmetic(), start=1):
                yield f"{ARITHMETIC} record {number}", record
    for chunk in chunks(files):
        yield from parse_chunk(chunk, skip_bad_lines=False).records


def _field(record: dict, key: str, where: str, kind: str):
    if key not in record:
        present = ", ".join(map(repr, record)) or "none"
        raise DataError(f"{where}: no key {key!r}; {kind} records have "
                        f"{'prompt, chosen, rejected' if kind == 'preference' else 'prompt (and answer)'}"
                        f"; the keys present are: {present}")
    return record[key]


def prompt_messages(record: dict, where: str, kind: str, system: Optional[str]) -> list[dict]:
    value = _field(record, "prompt", where, kind)
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and all(isinstance(m, dict) and m.get("role") in chat.ROLES
                                         and isinstance(m.get("content"), str) for m in value):
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise DataError(f"{where}: 'prompt' must be text or a list of messages with role "
                        f"({', '.join(chat.ROLES)}) and content")
    system = record.get("system") or system
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": str(system)})
    return messages


def _reply(record: dict, key: str, where: str) -> str:
    value = _field(record, key, where, "preference")
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        replies = [m.get("content") for m in value
                   if isinstance(m, dict) and m.get("role") == "assistant"]
        if replies and isinstance(replies[-1], str):
            return replies[-1]
    raise DataError(f"{where}: {key!r} must be text, or messages ending in an assistant turn")


@dataclass
class Encoded:
    """Token ids and loss mask (1 on the reply and the token that ends it)."""

    ids: list[int]
    mask: list[int]


def encode_pair(record: dict, where: str, template, tokenizer: Tokenizer,
                system: Optional[str]) -> tuple[Encoded, Encoded]:
    """Chosen and rejected conversation of a preference record."""
    prompt = prompt_messages(record, where, "preference", system)
    return tuple(Encoded(*chat.encode(prompt + [{"role": "assistant",
                                                  "content": _reply(record, key, where)}],
                                       template, tokenizer))
                 for key in ("chosen", "rejected"))


@dataclass
class Prompt:
    """A prompt ready to generate from: its tokens up to the assistant's turn."""

    ids: list[int]
    answer: Optional[str]


def generation_prompt(messages: list[dict], template, tokenizer: Tokenizer
                      ) -> tuple[list[int], list[int]]:
    """Tokens that open the assistant's turn after `messages`, and the tokens that end a reply
    (what the template trains after an empty reply: `<|im_end|>` for ChatML)."""
    ids, mask = chat.encode(messages + [{"role": "assistant", "content": ""}], template,
                            tokenizer)
    first = mask.index(1) if 1 in mask else len(ids)
    return ids[:first], [i for i, m in zip(ids, mask) if m]


def encode_prompts(entries: Sequence[str], template, tokenizer: Tokenizer,
                   system: Optional[str]) -> tuple[list[Prompt], list[int]]:
    """Every prompt record as tokens, and the ids that end a reply (the template's end token
    and the tokenizer's end of document)."""
    prompts, stops = [], {tokenizer.eod}
    for where, record in read(entries):
        messages = prompt_messages(record, where, "prompts", system)
        ids, ends = generation_prompt(messages, template, tokenizer)
        stops.update(ends)
        answer = record.get("answer")
        prompts.append(Prompt(ids, None if answer is None else str(answer)))
    if not prompts:
        raise DataError(f"{', '.join(entries)}: no prompts found")
    return prompts, sorted(i for i in stops if i is not None and i >= 0)
