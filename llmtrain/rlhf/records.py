"""Preference and prompt records, read like the SFT sources (json/jsonl/parquet through
llmtrain.data.sources) and turned into tokens with the same chat templates (llmtrain.data.chat).

- preference (stage=rm, dpo): {"prompt", "chosen", "rejected"}; the prompt is text (one user
  turn) or a list of role/content messages, each reply text or messages whose last assistant
  turn is the reply; an optional "system".
- unpaired (stage=kto): {"prompt", "completion", "label"}, TRL's unpaired preference format;
  label true marks a desirable completion, false an undesirable one; the completion is text or
  messages, like a preference reply.
- prompts (stage=grpo, ppo): {"prompt", "answer"}; the answer (optional) is what the
  exact_match and math rules compare the reply's answer with (the code rule: its tests).

`arithmetic` in data.data_path stands for a generated set of small sums (every kind), so that
every stage runs as it is. A record of another kind than the stage reads is refused with what
to do instead (`wrong_kind`), before launch for each file's first record (llmtrain.config.inputs)
and by the loaders for every record.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

from llmtrain.data import chat
from llmtrain.data.sources import DataError, chunks, parse_chunk
from llmtrain.data.tokenizer import Tokenizer
from llmtrain.tasks import either, stages_where

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


def unpaired_arithmetic(count: int = 2000, seed: int = 0) -> list[dict]:
    """The small sums as unpaired records: each right answer desirable, each near miss not."""
    return [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
            for r in arithmetic(count, seed) for key in ("chosen", "rejected")]


def read(entries: Sequence[str], generated: Callable[[], list[dict]] = arithmetic
         ) -> Iterator[tuple[str, dict]]:
    """(where, record) of every source in data.data_path; `arithmetic` gives the records of
    `generated`."""
    files = [e for e in entries if e != ARITHMETIC]
    for entry in entries:
        if entry == ARITHMETIC:
            for number, record in enumerate(generated(), start=1):
                yield f"{ARITHMETIC} record {number}", record
    for chunk in chunks(files):
        yield from parse_chunk(chunk, skip_bad_lines=False).records


KEYS = {"preference": "prompt, chosen, rejected", "unpaired": "prompt, completion, label",
        "prompts": "prompt (and answer)"}
SFT_KEYS = ("messages", "conversations", "instruction")


def record_kind(record: dict) -> Optional[str]:
    """The kind of data a record's keys say it is: preference, unpaired, sft or prompts."""
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "completion" in record and "label" in record:
        return "unpaired"
    if any(key in record for key in SFT_KEYS):
        return "sft"
    return "prompts" if "prompt" in record else None


# What to do with a record of another kind than the stage's (preference or unpaired data).
ADVICE = {
    ("unpaired", "preference"): "train on pairs with stage=dpo data=preference, or write each "
                                "pair as two records: the chosen reply with label true, the "
                                "rejected one with label false",
    ("unpaired", "sft"): "train on conversations with stage=sft data=sft, or write each reply as "
                         "{prompt, completion, label} with label true (desirable) or false",
    ("preference", "unpaired"): "train on unpaired completions with stage=kto data=unpaired, or "
                                "pair a desirable and an undesirable completion of each prompt "
                                "as {prompt, chosen, rejected}",
    ("preference", "sft"): "train on conversations with stage=sft data=sft, or give each prompt a "
                           "chosen and a rejected reply",
}
NAMES = {"preference": "a paired preference record (prompt, chosen, rejected)",
         "unpaired": "an unpaired record (prompt, completion, label), as KTO reads",
         "sft": "an SFT conversation"}


def wrong_kind(record: dict, kind: str, where: str) -> Optional[str]:
    """Why a record of `kind` data (preference or unpaired) is of another kind, and what to do;
    None when it is not."""
    found = record_kind(record)
    if (kind, found) not in ADVICE:
        return None
    readers = either(stages_where(lambda spec: kind in spec.data_kinds))
    return (f"{where}: {NAMES[found]}, but data={kind} (stage={readers}) reads "
            f"{{{KEYS[kind]}}} records: {ADVICE[kind, found]}")


def _field(record: dict, key: str, where: str, kind: str):
    if key not in record:
        present = ", ".join(map(repr, record)) or "none"
        raise DataError(wrong_kind(record, kind, where)
                        or f"{where}: no key {key!r}; {kind} records have {KEYS[kind]}; the "
                           f"keys present are: {present}")
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


def _reply(record: dict, key: str, where: str, kind: str = "preference") -> str:
    value = _field(record, key, where, kind)
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


def _check_kind(record: dict, kind: str, where: str) -> None:
    problem = wrong_kind(record, kind, where)
    if problem:
        raise DataError(problem)


def encode_pair(record: dict, where: str, template, tokenizer: Tokenizer,
                system: Optional[str]) -> tuple[Encoded, Encoded]:
    """Chosen and rejected conversation of a preference record."""
    _check_kind(record, "preference", where)
    prompt = prompt_messages(record, where, "preference", system)
    return tuple(Encoded(*chat.encode(prompt + [{"role": "assistant",
                                                  "content": _reply(record, key, where)}],
                                       template, tokenizer))
                 for key in ("chosen", "rejected"))


@dataclass
class Unpaired:
    """A KTO example: the prompt's tokens, then the completion's and its loss mask (1 on the
    completion and the token that ends it), apart, so that a prompt can be joined with another
    example's completion (KTO's reference point)."""

    prompt: list[int]
    completion: list[int]
    mask: list[int]
    desirable: bool


def encode_unpaired(record: dict, where: str, template, tokenizer: Tokenizer,
                    system: Optional[str]) -> Unpaired:
    """A record of unpaired data as tokens."""
    _check_kind(record, "unpaired", where)
    prompt = prompt_messages(record, where, "unpaired", system)
    completion = _reply(record, "completion", where, "unpaired")
    label = _field(record, "label", where, "unpaired")
    if not isinstance(label, bool):
        raise DataError(f"{where}: 'label' must be true (a desirable completion) or false (an "
                        f"undesirable one), not {label!r}")
    ids, mask = chat.encode(prompt + [{"role": "assistant", "content": completion}], template,
                            tokenizer)
    first = mask.index(1) if 1 in mask else len(ids)
    return Unpaired(ids[:first], ids[first:], mask[first:], label)


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
