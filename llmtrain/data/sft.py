"""Supervised fine-tuning data: conversations to token + loss-mask datasets, and the sequences
training reads from them, padded (one conversation each) or packed (several, no attention
across their borders).

On disk a tokenized SFT set is a prefix P with two Megatron indexed datasets of equal lengths,
`P_sft_tokens` (token ids) and `P_sft_loss_mask` (uint8, 1 on the assistant's tokens), and
`P_sft.json` (the tokenizer and template used, counts), written last: a set without it is
incomplete. `python -m llmtrain.data tokenize --sft` writes one for large sets; small json/jsonl/
parquet files in data.data_path are tokenized into the run's data cache when it starts.

A sequence of seq_length tokens is built like a GPT sample: ids[:-1] are the inputs, ids[1:] the
labels, and the loss mask is that of the labels, so exactly the assistant's tokens are trained.
Samples of every rank are a pure function of (seed, index): resume is token-exact.
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from llmtrain.config.schema import Config, SFTConfig, TokenizerConfig
from llmtrain.config.validate import split_fractions
from llmtrain.data import chat, indexed, selfcognition
from llmtrain.data.hf_datasets import folder_fingerprint
from llmtrain.data.sources import Chunk, DataError, chunks, parse_chunk
from llmtrain.data.tokenizer import Tokenizer, load_tokenizer
from llmtrain.data.workers import Progress, ordered_map

SELF_COGNITION = "self-cognition"
SPLITS = ("train", "valid", "test")


def tokens_prefix(prefix: str | Path) -> Path:
    return Path(f"{prefix}_sft_tokens")


def mask_prefix(prefix: str | Path) -> Path:
    return Path(f"{prefix}_sft_loss_mask")


def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}_sft.json")


def is_tokenized(prefix: str | Path) -> bool:
    return meta_path(prefix).exists()


# ---------------------------------------------------------------------------------------------
# Conversations to tokens.

@dataclass
class SFTWriteSummary:
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    bad_lines: int = 0
    seconds: float = 0.0


_worker: dict = {}


def _init_worker(tokenizer_cfg: TokenizerConfig, sft: SFTConfig, skip_bad_lines: bool) -> None:
    tokenizer = load_tokenizer(tokenizer_cfg).single_threaded()
    _worker.update(tokenizer=tokenizer, template=chat.load_template(sft.chat_template, tokenizer),
                   sft=sft, skip_bad_lines=skip_bad_lines)


def _encode_chunk(chunk: Chunk):
    tokenizer, template, sft = _worker["tokenizer"], _worker["template"], _worker["sft"]
    parsed = parse_chunk(chunk, _worker["skip_bad_lines"])
    ids, masks = [], []
    for where, record in parsed.records:
        messages = chat.to_messages(record, sft.format, where, sft.system)
        sample_ids, sample_mask = chat.encode(messages, template, tokenizer)
        ids.append(sample_ids)
        masks.append(sample_mask)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((i for s in ids for i in s), dtype=np.int32, count=int(lengths.sum()))
    mask = np.fromiter((m for s in masks for m in s), dtype=np.uint8, count=int(lengths.sum()))
    return flat, mask, lengths, parsed.bad_lines


def source_chunks(entries: Sequence[str], sft: SFTConfig) -> Iterable[Chunk]:
    """Chunks of raw conversation sources: files, and the generated self-cognition set."""
    files = []
    for entry in entries:
        if entry == SELF_COGNITION:
            yield from chunks(files)
            files = []
            records = selfcognition.conversations(sft.model_name, sft.model_author)
            yield Chunk(SELF_COGNITION, 1, "record", records=records)
        else:
            files.append(entry)
    yield from chunks(files)


def write_tokenized(entries: Sequence[str], prefix: str | Path, tokenizer_cfg: TokenizerConfig,
                    sft: SFTConfig, workers: int = 1, skip_bad_lines: bool = False,
                    progress: bool = True) -> SFTWriteSummary:
    """Tokenize conversations into the SFT format at `prefix`, atomically."""
    tokenizer = load_tokenizer(tokenizer_cfg)
    chat.load_template(sft.chat_template, tokenizer)  # fail here, before any worker starts
    summary = SFTWriteSummary()
    meta_path(prefix).unlink(missing_ok=True)
    tokens = indexed.IndexedDatasetWriter(tokens_prefix(prefix), tokenizer.vocab_size)
    masks = indexed.IndexedDatasetWriter(mask_prefix(prefix), dtype=np.uint8)
    meter = Progress("tokenize", enabled=progress)
    try:
        for flat, mask, lengths, bad in ordered_map(
                _encode_chunk, source_chunks(entries, sft), workers, _init_worker,
                (tokenizer_cfg, sft, skip_bad_lines)):
            tokens.add_documents(flat, lengths)
            masks.add_documents(mask, lengths)
            summary.samples += len(lengths)
            summary.tokens += flat.size
            summary.trained_tokens += int(mask.sum())
            summary.bad_lines += bad
            meter.update(len(lengths), flat.size)
        if summary.samples == 0:
            raise DataError(f"{', '.join(entries)}: no conversations found: check that the files "
                            f"hold records of the alpaca, sharegpt or messages format")
        tokens.close()
        masks.close()
    except BaseException:
        tokens.abort()
        masks.abort()
        raise
    finally:
        meter.close()
    summary.seconds = meter.seconds
    meta = {"version": 1, "samples": summary.samples, "tokens": summary.tokens,
            "trained_tokens": summary.trained_tokens, "sources": list(entries),
            "format": sft.format, "chat_template": sft.chat_template, "system": sft.system,
            "tokenizer": {"identity": tokenizer.identity, "vocab_size": tokenizer.vocab_size,
                          "config": asdict(tokenizer_cfg)}}
    tmp = meta_path(prefix).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    os.replace(tmp, meta_path(prefix))
    return summary


def _source_key(entries: Sequence[str], sft: SFTConfig, tokenizer: Tokenizer) -> str:
    parts = [tokenizer.identity, sft.format, sft.chat_template, repr(sft.system)]
    for entry in entries:
        if entry == SELF_COGNITION:
            parts += [entry, sft.model_name, sft.model_author]
        else:
            path = Path(entry)
            if path.is_dir():  # a dataset in the Hugging Face formats
                parts.append(folder_fingerprint(path))
                continue
            if not path.is_file():
                raise DataError(f"data.data_path entry {entry}: no such file, and no tokenized "
                                f"SFT set (`{entry}_sft.json`); entries are json/jsonl/parquet "
                                f"files, Hugging Face dataset folders, prefixes written by "
                                f"`python -m llmtrain.data tokenize "
                                f"--sft`, or {SELF_COGNITION}")
            stat = path.stat()
            parts += [str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def tokenized_prefixes(cfg: Config, tokenizer: Tokenizer, cache_dir: str | Path) -> list[Path]:
    """The tokenized sets of data.data_path: raw sources are tokenized once into the cache
    (several processes asking at once wait for the first)."""
    entries = [str(e) for e in cfg.data.data_path]
    weights = [e for e in entries if _is_number(e)]
    if weights:
        raise DataError(f"data.kind=sft takes no blend weights (found {', '.join(weights)}): "
                        f"list the sources; every conversation is used once per epoch")
    prefixes = [Path(e) for e in entries if e != SELF_COGNITION and is_tokenized(e)]
    raw = [e for e in entries if e == SELF_COGNITION or not is_tokenized(e)]
    for prefix in prefixes:
        _check_tokenizer(prefix, tokenizer)
    if raw:
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        prefix = cache_dir / f"sft_{_source_key(raw, cfg.data.sft, tokenizer)}"
        with open(f"{prefix}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not is_tokenized(prefix):
                write_tokenized(raw, prefix, cfg.data.tokenizer, cfg.data.sft, progress=False)
        prefixes.append(prefix)
    return prefixes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_tokenizer(prefix: Path, tokenizer: Tokenizer) -> None:
    meta = json.loads(meta_path(prefix).read_text())
    if meta["tokenizer"]["identity"] != tokenizer.identity:
        raise DataError(f"{prefix} was tokenized with another tokenizer (identity "
                        f"{meta['tokenizer']['identity']}, data.tokenizer has "
                        f"{tokenizer.identity}): tokenize it again with the model's tokenizer")


# ---------------------------------------------------------------------------------------------
# Tokens to training sequences.

class TokenizedSFT:
    """Every sample (ids, loss mask) of one or more tokenized sets, end to end."""

    def __init__(self, prefixes: Sequence[str | Path]):
        self.parts = []
        for prefix in prefixes:
            if not is_tokenized(prefix):
                raise DataError(f"{prefix}: no tokenized SFT set ({meta_path(prefix)} is "
                                f"missing: an interrupted write, or not written yet): tokenize it "
                            f"again with `python -m llmtrain.data tokenize --sft`")
            tokens = indexed.IndexedDatasetReader(tokens_prefix(prefix))
            masks = indexed.IndexedDatasetReader(mask_prefix(prefix))
            if not np.array_equal(tokens.sequence_lengths, masks.sequence_lengths):
                raise DataError(f"{prefix}: tokens and loss mask differ in length: write it "
                                f"again")
            self.parts.append((tokens, masks))
        self.offsets = np.cumsum([0] + [len(t) for t, _ in self.parts])
        self.lengths = np.concatenate([t.sequence_lengths for t, _ in self.parts]
                                      ).astype(np.int64) if self.parts else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        part = int(np.searchsorted(self.offsets, i, side="right")) - 1
        tokens, masks = self.parts[part]
        j = i - int(self.offsets[part])
        return np.asarray(tokens[j], dtype=np.int64), np.asarray(masks[j], dtype=np.int64)

    def max_token_id(self) -> int:
        return max((t.max_token_id() for t, _ in self.parts), default=-1)


def split_samples(count: int, split: str, seed: int) -> list[np.ndarray]:
    """Sample indices of train, valid and test: a seeded shuffle cut at the split's bounds
    (data.split, as Megatron reads it)."""
    order = np.random.default_rng(seed).permutation(count)
    bounds = np.round(np.cumsum([0.0] + split_fractions(split)) * count).astype(int)
    return [np.sort(order[bounds[k]:bounds[k + 1]]) for k in range(3)]


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: items (by index) into as few bins of `capacity` as it finds."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[int] = []
    by_space: dict[int, list[int]] = {}  # free space -> bins with that much room
    spaces: list[int] = []  # sorted keys of by_space
    for item in order:
        need = lengths[item]
        at = bisect.bisect_left(spaces, need)
        if at < len(spaces):
            space = spaces[at]
            target = by_space[space].pop()
            if not by_space[space]:
                del by_space[space]
                spaces.pop(at)
        else:
            target = len(bins)
            bins.append([])
            free.append(capacity)
        bins[target].append(item)
        free[target] -= need
        if free[target] > 0:
            if free[target] not in by_space:
                by_space[free[target]] = []
                bisect.insort(spaces, free[target])
            by_space[free[target]].append(target)
    return bins


@dataclass
class SequencePlan:
    """Which samples make each sequence of one split, before the per-epoch shuffle."""

    rows: list[list[int]]
    samples: int  # conversations used
    truncated: int  # conversations cut to seq_length
    dropped: int  # conversations left with no trained token after the cut
    trained_tokens: int = 0
    max_segments: int = 1


def plan_sequences(data: TokenizedSFT, indices: np.ndarray, seq_length: int,
                   packing: bool) -> SequencePlan:
    """Sequences of a split: one sample each (padded) or packed; long samples are cut."""
    keep, lengths, truncated, dropped, trained = [], [], 0, 0, 0
    for i in map(int, indices):
        length = int(data.lengths[i])
        if length > seq_length + 1:
            truncated += 1
            length = seq_length + 1
        mask = data[i][1][1:length]
        if length < 2 or not mask.any():
            dropped += 1
            continue
        keep.append(i)
        lengths.append(length - 1)
        trained += int(mask.sum())
    if packing:
        rows = [[keep[j] for j in row] for row in pack(lengths, seq_length)]
    else:
        rows = [[i] for i in keep]
    max_segments = max((len(r) for r in rows), default=1) + 1  # + the padding after them
    return SequencePlan(rows, len(keep), truncated, dropped, trained, max_segments)


class SFTDataset:
    """Training sequences of a split, cycled over epochs (reshuffled each epoch) up to
    `num_samples`; items are the batch dict the training loop consumes."""

    def __init__(self, data: TokenizedSFT, plan: SequencePlan, seq_length: int, num_samples: int,
                 seed: int, pad_id: int, attention_mask: bool, cu_seqlens: bool):
        if not plan.rows:
            raise ValueError("an SFT split with no sequences")
        self.data, self.plan = data, plan
        self.seq_length = seq_length
        self.num_samples = num_samples
        self.seed = seed
        self.pad_id = pad_id
        self.attention_mask = attention_mask
        self.cu_seqlens = cu_seqlens
        self._epoch, self._order = -1, None

    def __len__(self) -> int:
        return self.num_samples

    def _row(self, index: int) -> list[int]:
        epoch, k = divmod(index, len(self.plan.rows))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(
                len(self.plan.rows))
        return self.plan.rows[int(self._order[k])]

    def __getitem__(self, index: int) -> dict:
        s = self.seq_length
        tokens = np.full(s, self.pad_id, dtype=np.int64)
        labels = np.full(s, self.pad_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.arange(s, dtype=np.int64)
        segments = np.zeros(s, dtype=np.int64)
        bounds = [0]
        for number, sample in enumerate(self._row(index)):
            ids, mask = self.data[sample]
            ids, mask = ids[:s + 1], mask[:s + 1]
            start, end = bounds[-1], bounds[-1] + len(ids) - 1
            tokens[start:end] = ids[:-1]
            labels[start:end] = ids[1:]
            loss_mask[start:end] = mask[1:]
            position_ids[start:end] = np.arange(end - start)
            segments[start:end] = number
            bounds.append(end)
        if bounds[-1] < s:  # the padding is a segment of its own
            position_ids[bounds[-1]:] = np.arange(s - bounds[-1])
            segments[bounds[-1]:] = len(bounds) - 1
            bounds.append(s)
        item = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                "position_ids": position_ids}
        if self.attention_mask:  # True = masked, as Megatron's attention reads it
            causal = np.tril(np.ones((s, s), dtype=bool))
            allowed = causal & (segments[:, None] == segments[None, :])
            item["attention_mask"] = ~allowed[None]
        if self.cu_seqlens:
            cu = np.full(self.plan.max_segments + 1, -1, dtype=np.int32)
            cu[:len(bounds)] = bounds
            item["cu_seqlens"] = cu
            item["max_seqlen"] = np.int32(np.diff(bounds).max())
        return item


@dataclass
class SFTData:
    """What the run trains and evaluates on, and the numbers it reports."""

    data: TokenizedSFT
    plans: dict[str, SequencePlan] = field(default_factory=dict)

    def describe(self, seq_length: int, packing: bool) -> str:
        train = self.plans["train"]
        how = (f"packed into {len(train.rows)} sequences of {seq_length}" if packing
               else f"one per sequence, padded to {seq_length}")
        text = (f"sft data: {len(self.data)} conversations, {self.plans['train'].samples} for "
                f"training ({how}; {train.trained_tokens} trained tokens)")
        if self.plans["valid"].samples:
            text += f", {self.plans['valid'].samples} for validation"
        cut = sum(p.truncated for p in self.plans.values())
        dropped = sum(p.dropped for p in self.plans.values())
        if cut:
            text += f"; {cut} cut to seq_length"
        if dropped:
            text += f"; {dropped} dropped (no reply token within seq_length)"
        return text


def load_sft(cfg: Config, tokenizer: Tokenizer, cache_dir: str | Path) -> SFTData:
    """The run's SFT data: tokenized (cached) and planned into sequences per split."""
    data = TokenizedSFT(tokenized_prefixes(cfg, tokenizer, cache_dir))
    biggest = data.max_token_id()
    if biggest >= cfg.model.vocab_size:
        raise DataError(f"the SFT data holds token id {biggest}, at or above the vocabulary size "
                        f"{cfg.model.vocab_size} of model {cfg.model.name} (the tokenizer has "
                        f"{tokenizer.vocab_size} tokens): use the model's tokenizer, or a "
                        f"model whose vocab_size is above {biggest}")
    result = SFTData(data)
    for name, indices in zip(SPLITS, split_samples(len(data), cfg.data.split, cfg.seed)):
        result.plans[name] = plan_sequences(data, indices, cfg.data.seq_length,
                                            cfg.data.sft.packing)
    return result


def _empty_split(name: str, sft: SFTData, cfg: Config) -> DataError:
    share = split_fractions(cfg.data.split)[SPLITS.index(name)]
    plan = sft.plans[name]
    if plan.dropped:
        why = (f"its {plan.dropped} conversation(s) have no reply token within data.seq_length="
               f"{cfg.data.seq_length}: raise seq_length")
    else:
        why = (f"data.split={cfg.data.split} gives it {share:.1%} of {len(sft.data)} "
               f"conversations, which rounds to none: raise its share of data.split")
    hint = " or set stage.eval_interval=0" if name == "valid" else ""
    return DataError(f"the {name} split has no samples: {why}{hint}")


def build_sft_datasets(cfg: Config, tokenizer: Tokenizer, cache_dir: str | Path,
                       train_samples: int, valid_samples: int, device: str):
    """Train and validation SFTDatasets (validation None when no evaluation runs) and the
    line that describes them."""
    sft = load_sft(cfg, tokenizer, cache_dir)
    pad = tokenizer.pad if tokenizer.pad >= 0 else tokenizer.eod
    packed_gpu = cfg.data.sft.packing and device == "cuda"
    datasets = []
    for name, samples in (("train", train_samples), ("valid", valid_samples)):
        if samples == 0:
            datasets.append(None)
            continue
        if not sft.plans[name].rows:
            raise _empty_split(name, sft, cfg)
        datasets.append(SFTDataset(sft.data, sft.plans[name], cfg.data.seq_length, samples,
                                   cfg.seed + SPLITS.index(name), pad,
                                   attention_mask=device == "cpu", cu_seqlens=packed_gpu))
    return datasets[0], datasets[1], sft.describe(cfg.data.seq_length, cfg.data.sft.packing)


def derive_train_iters(cfg: Config, cache_dir: str | Path) -> Optional[str]:
    """With stage.epochs set: tokenize (once, cached) and set stage.train_iters to cover that
    many passes over the training sequences. Returns what was decided, for the console."""
    if not cfg.stage.epochs:
        return None
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size)
    sft = load_sft(cfg, tokenizer, cache_dir)
    rows = len(sft.plans["train"].rows)
    if rows == 0:
        raise _empty_split("train", sft, cfg)
    gbs = cfg.stage.global_batch_size
    cfg.stage.train_iters = max(1, -(-cfg.stage.epochs * rows // gbs))
    return (f"{sft.describe(cfg.data.seq_length, cfg.data.sft.packing)}; {cfg.stage.epochs} "
            f"epoch(s) at global batch {gbs}: stage.train_iters={cfg.stage.train_iters}")
