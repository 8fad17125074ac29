"""Small corpora, conversations and tokenizers that the data tests build for themselves."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# ChatML as Qwen's tokenizer_config.json writes it (no default system prompt).
CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


def documents(count: int = 60) -> list[str]:
    """Varied English and Chinese documents (no two alike)."""
    words = ["alpha", "beta", "gamma", "delta", "token", "model", "data", "shard", "模型", "数据",
             "训练", "语言"]
    return [f"Document {i}: " + " ".join(words[(i * k) % len(words)] for k in range(3 + i % 17))
            + ("\n\nA second paragraph." if i % 5 == 0 else "") for i in range(count)]


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Records as JSON lines; `raw_lines` puts literal text at given 0-based line numbers."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    for at, text in sorted((raw_lines or {}).items()):
        lines.insert(at, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def train_bpe(directory: Path, vocab_size: int = 600):
    """A byte-level BPE with the chat templates' special tokens, saved as tokenizer.json, as a
    transformers tokenizer directory with a ChatML chat_template, and as GPT-2 vocab/merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=CHAT_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(documents(200) + [c["messages"][-1]["content"]
                                                    for c in conversations()], trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    tokenizer.model.save(str(directory))  # vocab.json + merges.txt
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                            chat_template=CHATML_JINJA).save_pretrained(str(directory / "hf"))
    return tokenizer


def train_sentencepiece(directory: Path) -> Path:
    import sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    text = directory / "spm_text.txt"
    replies = [m["content"] for c in conversations() for m in c["messages"]]
    text.write_text("\n".join(documents(200) + replies * 20), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=str(directory / "spm"), vocab_size=150, model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    return directory / "spm.model"


def conversations() -> list[dict]:
    """Conversations in the messages format: one and two assistant turns, with a system."""
    return [
        {"messages": [{"role": "user", "content": "What is a shard?"},
                      {"role": "assistant", "content": "A shard is one piece of the data."}]},
        {"messages": [{"role": "system", "content": "You answer briefly."},
                      {"role": "user", "content": "Name a Greek letter."},
                      {"role": "assistant", "content": "alpha"},
                      {"role": "user", "content": "Another one?"},
                      {"role": "assistant", "content": "beta, then gamma."}]},
        {"messages": [{"role": "user", "content": "翻译：模型"},
                      {"role": "assistant", "content": "model"}]},
    ]


def as_alpaca(conversation: dict) -> dict:
    """A one-turn conversation in the alpaca format (instruction + input + output)."""
    user, assistant = (m["content"] for m in conversation["messages"][-2:])
    head, _, rest = user.partition(" ")
    return {"instruction": head, "input": rest, "output": assistant}


def as_sharegpt(conversation: dict) -> dict:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"conversations": [{"from": names[m["role"]], "value": m["content"]}
                              for m in conversation["messages"]]}
