"""Conversations for supervised fine-tuning: formats, chat templates, tokens and loss masks.

Records in the alpaca (instruction/input/output), sharegpt (conversations of from/value) or
OpenAI messages (role/content) format become one list of messages. A chat template turns the
messages into pieces of text and special tokens, each marked trained or not: only the
assistant's replies and the token that ends them are trained, so the loss mask is exact by
construction. Named templates (`chatml` for Qwen, `llama3`) name their special tokens, which
must be in the vocabulary; `tokenizer` renders the tokenizer directory's own Jinja
`chat_template` through transformers and finds each reply by rendering growing prefixes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from llmtrain.data.sources import DataError
from llmtrain.data.tokenizer import Tokenizer

FORMATS = ("auto", "alpaca", "sharegpt", "messages")
TEMPLATES = ("chatml", "llama3", "tokenizer")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}

Message = dict  # {"role": ..., "content": ...}


def _require(record: dict, key: str, where: str, fmt: str):
    if key not in record:
        present = ", ".join(map(repr, record)) or "none"
        raise DataError(f"{where}: no key {key!r} for the {fmt} format; the keys present are: "
                        f"{present}")
    return record[key]


def _text(value, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} is a {type(value).__name__}, not text")
    return value


def detect_format(record: dict, where: str) -> str:
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record:
        return "alpaca"
    present = ", ".join(map(repr, record)) or "none"
    raise DataError(f"{where}: cannot tell the format from the keys present ({present}): "
                    f"expected 'messages' (messages), 'conversations' (sharegpt) or "
                    f"'instruction' and 'output' (alpaca); set the format explicitly")


def to_messages(record: dict, fmt: str, where: str, system: Optional[str] = None
                ) -> list[Message]:
    """The conversation of a record as messages; `system` is used when it brings none."""
    if fmt == "auto":
        fmt = detect_format(record, where)
    if fmt == "alpaca":
        instruction = _text(_require(record, "instruction", where, fmt), where, "'instruction'")
        output = _text(_require(record, "output", where, fmt), where, "'output'")
        extra = record.get("input") or ""
        prompt = f"{instruction}\n{_text(extra, where, 'input')}" if extra else instruction
        messages = []
        for turn, pair in enumerate(record.get("history") or []):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
                raise DataError(f"{where}: history entry {turn} is not a [question, answer] pair")
            messages += [{"role": "user", "content": _text(pair[0], where, "a history question")},
                         {"role": "assistant",
                          "content": _text(pair[1], where, "a history answer")}]
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        own_system = record.get("system")
    elif fmt == "sharegpt":
        turns = _require(record, "conversations", where, fmt)
        messages = []
        for turn, item in enumerate(turns):
            if not isinstance(item, dict) or "from" not in item or "value" not in item:
                raise DataError(f"{where}: conversations[{turn}] needs 'from' and 'value'")
            role = SHAREGPT_ROLES.get(item["from"])
            if role is None:
                raise DataError(f"{where}: conversations[{turn}] is from {item['from']!r}; "
                                f"sharegpt turns are from {', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": role, "content": _text(item["value"], where,
                                                            f"conversations[{turn}].value")})
        own_system = record.get("system")
    elif fmt == "messages":
        messages = []
        for turn, item in enumerate(_require(record, "messages", where, fmt)):
            if not isinstance(item, dict) or "role" not in item or "content" not in item:
                raise DataError(f"{where}: messages[{turn}] needs 'role' and 'content'")
            if item["role"] not in ROLES:
                raise DataError(f"{where}: messages[{turn}] has role {item['role']!r}; roles are "
                                f"{', '.join(ROLES)}")
            messages.append({"role": item["role"],
                             "content": _text(item["content"], where, f"messages[{turn}].content")})
        own_system = None
    else:
        raise DataError(f"unknown SFT format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if own_system is None and system and not (messages and messages[0]["role"] == "system"):
        own_system = system
    if own_system:
        messages.insert(0, {"role": "system", "content": _text(own_system, where, "'system'")})
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: the conversation has no assistant turn: nothing to train on; "
                        f"add the reply, or remove the record")
    return messages


@dataclass(frozen=True)
class Piece:
    """Text, or a special token by name; `trained` pieces carry loss."""

    text: str
    trained: bool = False
    special: bool = False


def _special(token: str, trained: bool = False) -> Piece:
    return Piece(token, trained, special=True)


class NamedTemplate:
    """A chat template written out here, with the special tokens it needs."""

    name = ""
    specials: tuple[str, ...] = ()

    def pieces(self, messages: list[Message]) -> list[Piece]:
        raise NotImplementedError


class ChatML(NamedTemplate):
    """`<|im_start|>role\\ncontent<|im_end|>\\n` per message (Qwen, Yi and others)."""

    name = "chatml"
    specials = ("<|im_start|>", "<|im_end|>")

    def pieces(self, messages):
        out = []
        for m in messages:
            out.append(_special("<|im_start|>"))
            if m["role"] == "assistant":
                out += [Piece("assistant\n"), Piece(m["content"], True),
                        _special("<|im_end|>", True)]
            else:
                out += [Piece(f"{m['role']}\n{m['content']}"), _special("<|im_end|>")]
            out.append(Piece("\n"))
        return out


class Llama3(NamedTemplate):
    """Llama 3 Instruct: headers between `<|start_header_id|>`/`<|end_header_id|>`, turns
    ended by `<|eot_id|>`, content trimmed."""

    name = "llama3"
    specials = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")

    def pieces(self, messages):
        out = [_special("<|begin_of_text|>")]
        for m in messages:
            assistant = m["role"] == "assistant"
            out += [_special("<|start_header_id|>"), Piece(m["role"]),
                    _special("<|end_header_id|>"), Piece("\n\n")]
            out += [Piece(m["content"].strip(), assistant), _special("<|eot_id|>", assistant)]
        return out


NAMED = {t.name: t for t in (ChatML(), Llama3())}


class TokenizerTemplate:
    """The tokenizer directory's own `chat_template`, rendered by transformers."""

    name = "tokenizer"

    def __init__(self, tokenizer: Tokenizer):
        from transformers import AutoTokenizer

        if tokenizer.source is None or not tokenizer.source.is_dir():
            raise DataError("chat_template=tokenizer needs a Hugging Face tokenizer directory "
                            "(data.tokenizer.tokenizer_model) that has a chat template; "
                            "or choose a named template: chatml, llama3")
        self.hf = AutoTokenizer.from_pretrained(str(tokenizer.source))
        if not getattr(self.hf, "chat_template", None):
            raise DataError(f"the tokenizer in {tokenizer.source} has no chat_template: choose "
                            f"a named template (chatml, llama3)")

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=generation_prompt)

    def pieces(self, messages):
        full = self._render(messages, False)
        out, done = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], True)
            through = self._render(messages[:i + 1], False)
            if not (full.startswith(before) and full.startswith(through)
                    and len(before) >= done):
                raise DataError("the tokenizer's chat_template renders earlier turns "
                                "differently once later turns follow, so replies cannot be "
                                "located: choose a named template (chatml, llama3)")
            end = len(through.rstrip())  # a newline after the end token is not trained
            out += [Piece(full[done:len(before)]), Piece(full[len(before):end], True)]
            done = end
        out.append(Piece(full[done:]))
        return [p for p in out if p.text]


def load_template(name: str, tokenizer: Tokenizer):
    """A template ready for this tokenizer; missing special tokens are listed."""
    if name == "tokenizer":
        return TokenizerTemplate(tokenizer)
    if name not in NAMED:
        raise DataError(f"unknown chat template {name!r}: choose one of {', '.join(TEMPLATES)}")
    template = NAMED[name]
    missing = [t for t in template.specials if tokenizer.token_id(t) is None]
    if missing:
        raise DataError(f"chat template {name} needs the special tokens {', '.join(missing)}, "
                        f"which the tokenizer does not have: choose the template the model was "
                        f"trained with, or chat_template=tokenizer")
    return template


def encode(messages: list[Message], template, tokenizer: Tokenizer
           ) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 = trained) of a conversation. Neighbouring text pieces with
    the same mark are encoded together, so text is cut only where the mark changes."""
    ids: list[int] = []
    mask: list[int] = []
    pending: list[str] = []
    pending_mark = False

    def flush():
        if pending:
            encoded = tokenizer.encode("".join(pending))
            ids.extend(encoded)
            mask.extend([int(pending_mark)] * len(encoded))
            pending.clear()

    for piece in template.pieces(messages):
        if piece.special:
            flush()
            ids.append(tokenizer.token_id(piece.text))
            mask.append(int(piece.trained))
        else:
            if pending and piece.trained != pending_mark:
                flush()
            pending_mark = piece.trained
            pending.append(piece.text)
    flush()
    return ids, mask
