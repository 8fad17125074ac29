"""Showing a document or an SFT sample as tokens: `python -m llmtrain.data inspect`.

The layout is ms-swift's: `[INPUT_IDS]`, `[INPUT]` (the decoded text, special tokens included)
and, for SFT samples, `[LABELS]`, where each run of tokens that carries no loss is shown as
`[-100 * N]` and the trained tokens as their text. `--tokens` adds one line per token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from llmtrain.config.schema import SFTConfig, TokenizerConfig
from llmtrain.data import chat, indexed, sft
from llmtrain.data.sources import DataError, chunks, parse_chunk, text_field
from llmtrain.data.tokenizer import Tokenizer, load_tokenizer


def _runs(mask: Sequence[int]):
    start = 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            yield start, i, mask[start]
            start = i


def render(ids: Sequence[int], mask: Optional[Sequence[int]], tokenizer: Tokenizer,
           tokens: bool = False) -> str:
    ids = [int(i) for i in ids]
    lines = [f"[INPUT_IDS] {ids}", f"[INPUT] {tokenizer.decode(ids, keep_special=True)}"]
    if mask is not None:
        mask = [int(m) for m in mask]
        labels = "".join(tokenizer.decode(ids[a:b], keep_special=True) if on else f"[-100 * {b - a}]"
                         for a, b, on in _runs(mask))
        lines.append(f"[LABELS] {labels}")
    if tokens:
        lines.append(f"{'pos':>6} {'id':>8} {'loss':>4}  token")
        for pos, token in enumerate(ids):
            loss = "-" if mask is None else ("yes" if mask[pos] else "no")
            lines.append(f"{pos:>6} {token:>8} {loss:>4}  {tokenizer.token_text(token)!r}")
    return "\n".join(lines)


def _record(path: str, index: int) -> tuple[str, dict]:
    seen = 0
    for chunk in chunks([path]):
        records = parse_chunk(chunk, skip_bad_lines=False).records
        if index < seen + len(records):
            return records[index - seen]
        seen += len(records)
    raise DataError(f"{path} has {seen} record(s); --index {index} is beyond them: choose "
                        f"--index below {seen}")


def inspect(target: str, index: int, tokenizer_cfg: Optional[TokenizerConfig],
            sft_cfg: Optional[SFTConfig], json_key: str = "text", tokens: bool = False) -> str:
    """A sample of a tokenized SFT set, a document of an indexed dataset, or a record of a raw
    file (an SFT conversation when `sft_cfg` is given), shown as tokens."""
    if sft.is_tokenized(target):
        meta = json.loads(sft.meta_path(target).read_text())
        cfg = tokenizer_cfg or TokenizerConfig(**meta["tokenizer"]["config"])
        data = sft.TokenizedSFT([target])
        if not 0 <= index < len(data):
            raise DataError(f"{target} has {len(data)} samples; --index {index} is beyond them: "
                            f"choose --index below {len(data)}")
        ids, mask = data[index]
        head = (f"sample {index} of {target} ({meta['chat_template']} template): {len(ids)} "
                f"tokens, {int(mask.sum())} with loss")
        return head + "\n" + render(ids, mask, load_tokenizer(cfg), tokens)
    tokenizer = load_tokenizer(tokenizer_cfg or TokenizerConfig())
    if indexed.exists(target):
        reader = indexed.IndexedDatasetReader(target)
        if not 0 <= index < len(reader):
            raise DataError(f"{target} has {len(reader)} documents; --index {index} is beyond "
                            f"them: choose --index below {len(reader)}")
        ids = reader[index]
        return (f"document {index} of {target}: {len(ids)} tokens\n"
                + render(ids, None, tokenizer, tokens))
    if not Path(target).is_file():
        raise DataError(f"{target}: neither a file nor a dataset prefix (no {target}.idx or "
                        f"{sft.meta_path(target)}): give a file, or a prefix written by `python -m "
                    f"llmtrain.data tokenize`")
    where, record = _record(target, index)
    if sft_cfg is not None:
        template = chat.load_template(sft_cfg.chat_template, tokenizer)
        messages = chat.to_messages(record, sft_cfg.format, where, sft_cfg.system)
        ids, mask = chat.encode(messages, template, tokenizer)
        head = (f"sample {index} ({where}, {sft_cfg.chat_template} template): {len(ids)} "
                f"tokens, {sum(mask)} with loss")
        return head + "\n" + render(ids, mask, tokenizer, tokens)
    # As `tokenize` writes it by default: the template's special tokens, then the end of document.
    ids = tokenizer.encode_batch([text_field(record, json_key, where)], True)[0] + [tokenizer.eod]
    return f"document {index} ({where}): {len(ids)} tokens\n" + render(ids, None, tokenizer,
                                                                       tokens)
