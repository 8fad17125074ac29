"""Checks of what a run reads and where it writes, on this machine, before any process starts.

`validate` judges the config alone (a dry run may plan a job for another machine); these look at
the files and the machine a launch uses: a missing dataset, tokenizer or checkpoint found inside
the workers would cost a traceback per rank and leave a run folder behind. Each problem says
what to change; the command exits with status 2 (llmtrain.cli).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from llmtrain.config.schema import Config

# data_path entries that are no files: weights of a blend, and generated sets.
GENERATED = ("self-cognition", "arithmetic")
SUFFIXES = (".bin", ".idx")
_STEP = re.compile(r"iter_\d+|release")


def _is_weight(entry: str) -> bool:
    try:
        float(entry)
    except ValueError:
        return False
    return True


def data_path_problems(cfg: Config) -> list[str]:
    """Every data_path entry must exist; one that names an indexed dataset (a prefix) needs both
    its .bin and its .idx."""
    data, problems = cfg.data, []
    if data.kind not in ("indexed", "sft", "preference", "prompts"):
        return problems
    for entry in map(str, data.data_path):
        if _is_weight(entry) or entry in GENERATED:
            continue
        if data.kind != "indexed" and Path(entry).exists() and not entry.endswith(SUFFIXES):
            continue  # a json/jsonl/parquet file the loader reads
        prefix = entry.removesuffix(".bin").removesuffix(".idx")
        bin_file, idx_file = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        if data.kind != "indexed" and prefix == entry and not Path(f"{prefix}_sft.json").exists():
            problems.append(f"data.data_path entry {entry}: no such file, and no tokenized set "
                            f"of that prefix; entries are json/jsonl/parquet files, prefixes "
                            f"written by `python -m llmtrain.data tokenize`, or "
                            f"{' / '.join(GENERATED)}")
        elif bin_file.is_file() and idx_file.is_file():
            if prefix != entry:
                problems.append(f"data.data_path entry {entry} names a file: give its prefix, "
                                f"{prefix} (Megatron reads {prefix}.bin and {prefix}.idx)")
        elif bin_file.is_file() or idx_file.is_file():
            present, absent = (bin_file, idx_file) if bin_file.is_file() else (idx_file, bin_file)
            problems.append(f"data.data_path entry {entry}: {present} exists but {absent} does "
                            f"not; copy it next to it, or tokenize the data again with `python "
                            f"-m llmtrain.data tokenize`")
        else:
            problems.append(f"data.data_path entry {entry}: no dataset there ({bin_file} and "
                            f"{idx_file} are missing); give the prefixes written by `python -m "
                            f"llmtrain.data tokenize`")
    return problems


def tokenizer_problems(cfg: Config) -> list[str]:
    """The tokenizer must load and fit the model's vocabulary (the corpus's own is built at
    launch and always fits)."""
    tok = cfg.data.tokenizer
    if tok.tokenizer_type in ("corpus", "null"):
        return []
    from llmtrain.data.tokenizer import load_tokenizer

    files = [getattr(tok, key) for key in ("tokenizer_model", "vocab_file", "merge_file")
             if getattr(tok, key)]
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        return [f"data.tokenizer: {', '.join(missing)} does not exist: point "
                f"data.tokenizer.tokenizer_model (or vocab_file/merge_file) at the tokenizer the "
                f"data was made with"]
    try:
        tokenizer = load_tokenizer(tok, cfg.model.vocab_size)
    except Exception as exc:  # tokenizers and sentencepiece raise plain Exceptions on bad files
        return [f"data.tokenizer: the {tok.tokenizer_type} tokenizer at {', '.join(files)} cannot "
                f"be read ({type(exc).__name__}: {exc}): is it a whole, valid tokenizer file?"]
    if tokenizer.vocab_size > cfg.model.vocab_size:
        return [f"the tokenizer has {tokenizer.vocab_size} tokens but model {cfg.model.name} has "
                f"vocab_size {cfg.model.vocab_size}: use a model whose vocabulary holds the "
                f"tokenizer's (or model.vocab_size={tokenizer.vocab_size} to train one from "
                f"scratch)"]
    return []


def same_folder(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def checkpoint_problems(cfg: Config) -> list[str]:
    """checkpoint.load must hold a checkpoint: a mistyped path would train from random weights.
    The save folder given as load (Megatron-LM's --load and --save of one folder) may be empty:
    the first run of a job starts fresh there."""
    ck = cfg.checkpoint
    if not ck.load or ck.resume == "never":
        return []
    load = Path(ck.load)
    save = Path(cfg.output_dir) / ck.save if ck.save else None
    if save is not None and same_folder(load, save):
        return []
    what = "fine-tune from" if ck.finetune else "load"
    if not load.exists():
        return [f"checkpoint.load={ck.load} does not exist, so there is nothing to {what}: fix "
                f"the path (relative paths start from the current folder, {os.getcwd()}), or "
                f"drop checkpoint.load to start from fresh weights"]
    if _STEP.fullmatch(load.name) and load.is_dir():
        return [f"checkpoint.load={ck.load} is one step's folder: give the folder that holds it, "
                f"checkpoint.load={load.parent} checkpoint.load_step="
                f"{int(load.name[5:]) if load.name != 'release' else 0}"]
    if not load.is_dir() or not any(_STEP.fullmatch(p.name) and p.is_dir()
                                    for p in load.iterdir()):
        return [f"checkpoint.load={ck.load} holds no checkpoint (no iter_NNNNNNN or release "
                f"folder inside), so there is nothing to {what}: give the folder a training run "
                f"saved into or `python -m llmtrain.convert` wrote"]
    return []


def problems(cfg: Config) -> list[str]:
    """Everything wrong with the files a launch on this machine reads."""
    return data_path_problems(cfg) + tokenizer_problems(cfg) + checkpoint_problems(cfg)
