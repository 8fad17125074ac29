"""Prompt files in, generation files out.

In: one prompt per line (Megatron-LM's and Pai-Megatron-Patch's prompt files; `\\n` inside a
line stays as written), or JSON lines, each an object with "prompt" (text) or "messages" (a
conversation, rendered with the chat template), plus any other keys (ids, references), which are
carried to the output. Out: JSON lines in the input's order, each the input record plus
"generated_text", "generated_tokens", "finish_reason" and "num_prompt_tokens".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmtrain.generate.plan import InferenceError
from llmtrain.generate.text import Text

FORMATS = ("auto", "lines", "jsonl")


def read(path: str, fmt: str = "auto") -> list[dict]:
    """The prompt records of a file; every malformed line is named at once."""
    file = Path(path)
    if not file.is_file():
        raise InferenceError(f"input={path} does not exist (a file of prompts is expected)")
    if fmt not in FORMATS:
        raise InferenceError(f"input_format={fmt} is not one of: {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = "jsonl" if file.suffix in (".jsonl", ".json") else "lines"
    lines = file.read_text(encoding="utf-8").splitlines()
    if fmt == "lines":
        records = [{"prompt": line} for line in lines if line.strip()]
    else:
        records, problems = [], []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                problems.append(f"line {number}: not JSON ({error.msg})")
                continue
            if not isinstance(record, dict) or ("prompt" in record) == ("messages" in record):
                problems.append(f"line {number}: needs exactly one of \"prompt\" (text) and "
                                f"\"messages\" (a conversation)")
            elif "prompt" in record and not isinstance(record["prompt"], str):
                problems.append(f"line {number}: \"prompt\" must be text")
            else:
                records.append(record)
        if problems:
            raise InferenceError(f"{path} has {len(problems)} malformed line(s):\n  - "
                                 + "\n  - ".join(problems[:20]))
    if not records:
        raise InferenceError(f"{path} holds no prompts: write one prompt per line, or JSON "
                             f"lines with \"prompt\" or \"messages\"")
    return records


def encode(records: list[dict], text: Text, path: str) -> list[list[int]]:
    """Token ids of every record's prompt (conversations through the chat template)."""
    ids, problems = [], []
    for number, record in enumerate(records, start=1):
        try:
            ids.append(text.chat(record["messages"]) if "messages" in record
                       else text.encode(record["prompt"]))
        except InferenceError as error:
            problems.append(f"prompt {number}: {error}")
    if problems:
        raise InferenceError(f"{path}: {len(problems)} prompt(s) cannot be used:\n  - "
                             + "\n  - ".join(problems[:20]))
    empty = [n for n, tokens in enumerate(ids, start=1) if not tokens]
    if empty:
        raise InferenceError(f"{path}: prompt(s) {', '.join(map(str, empty[:20]))} have no "
                             f"tokens: remove empty prompts")
    return ids


def write(path: str, records: list[dict]) -> None:
    """All records at once: a file that exists is complete."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, target)
