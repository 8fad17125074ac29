"""Text in and out of a served model: its tokenizer (llmtrain.data.tokenizer), chat template and
end-of-sequence tokens, and text that grows token by token (streaming, stop strings)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Optional

from llmtrain.data.tokenizer import Tokenizer, load_tokenizer
from llmtrain.generate.plan import InferenceError, Plan, generation_eos_ids

ROLES = ("system", "user", "assistant", "tool")


class Text:
    """Encode prompts and chats, decode generations, for one model."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, folder: Optional[str] = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.folder = Path(folder) if folder else None
        # The tokenizer's end of document, and those of generation_config.json.
        self.stop_ids = tuple(dict.fromkeys([tokenizer.eod, *generation_eos_ids(folder)]))

    @classmethod
    def load(cls, plan: Plan) -> "Text":
        tokenizer = load_tokenizer(plan.tokenizer, plan.model.vocab_size)
        if tokenizer.vocab_size > plan.model.vocab_size:
            raise InferenceError(f"the tokenizer has {tokenizer.vocab_size} tokens but model "
                                 f"{plan.model.name} only {plan.model.vocab_size}: it is not the "
                                 f"tokenizer of this model (tokenizer=...)")
        return cls(tokenizer, plan.model.vocab_size, plan.tokenizer_folder)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ids, special tokens left out."""
        return self.tokenizer.decode([int(i) for i in ids])

    def piece(self, token: int) -> str:
        """One token as text, special tokens written out (OpenAI's logprobs `tokens`)."""
        if self.tokenizer.kind == "sentencepiece":
            return self.tokenizer.backend.id_to_piece(int(token))
        return self.tokenizer.backend.decode([int(token)], skip_special_tokens=False)

    def token_id(self, text: str) -> Optional[int]:
        if self.tokenizer.kind == "sentencepiece":
            found = self.tokenizer.backend.piece_to_id(text)
            return found if self.tokenizer.backend.id_to_piece(found) == text else None
        return self.tokenizer.backend.token_to_id(text)

    @cached_property
    def _config(self) -> dict:
        path = self.folder / "tokenizer_config.json" if self.folder else None
        return json.loads(path.read_text()) if path and path.exists() else {}

    def special(self, name: str) -> Optional[str]:
        """bos_token / eos_token / pad_token of tokenizer_config.json, as text."""
        value = self._config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    @property
    def bos(self) -> Optional[int]:
        if self.tokenizer.bos is not None and self.tokenizer.bos >= 0:
            return self.tokenizer.bos
        name = self.special("bos_token")
        return self.token_id(name) if name else None

    @cached_property
    def chat_template(self) -> Optional[str]:
        """The Jinja chat template of the tokenizer folder (tokenizer_config.json or
        chat_template.jinja), if it has one."""
        if self.folder is None:
            return None
        jinja = self.folder / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text()
        template = self._config.get("chat_template")
        return template if isinstance(template, str) else None

    @cached_property
    def _hf_tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder))

    def chat(self, messages: list[dict]) -> list[int]:
        """The prompt of a conversation: the chat template rendered with the assistant's turn
        opened (as transformers' apply_chat_template does)."""
        check_messages(messages)
        if self.chat_template is None:
            raise InferenceError(f"the tokenizer{f' in {self.folder}' if self.folder else ''} "
                                 f"has no chat template (tokenizer_config.json 'chat_template' "
                                 f"or chat_template.jinja): send plain prompts, or give a "
                                 f"tokenizer= folder that has one")
        rendered = self._hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
        return self.encode(rendered)


def check_messages(messages) -> None:
    """Raise InferenceError naming the first malformed message."""
    if not isinstance(messages, list) or not messages:
        raise InferenceError("messages must be a non-empty list of {\"role\", \"content\"}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InferenceError(f"messages[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InferenceError(f"messages[{i}] has role {m['role']!r}; roles are "
                                 f"{', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InferenceError(f"messages[{i}].content must be text")
