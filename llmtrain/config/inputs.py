"""Checks of what a run reads and where it writes, on this machine, before any process starts.

`validate` judges the config alone (a dry run may plan a job for another machine); these look at
the files and the machine a launch uses: a missing dataset, tokenizer or checkpoint found inside
the workers would cost a traceback per rank and leave a run folder behind. Each problem says
what to change; the command exits with status 2 (llmtrain.cli).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from llmtrain.config.layout import Layout
from llmtrain.config.plan import GIB, checkpoint_bytes, memory_plan
from llmtrain.config.schema import Config

# data_path entries that name generated sets, not files.
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
    if data.kind not in ("indexed", "sft", "preference", "unpaired", "prompts"):
        return problems
    for entry in map(str, data.data_path):
        if _is_weight(entry) or entry in GENERATED:
            continue
        if data.kind != "indexed" and not entry.endswith(SUFFIXES) and (
                Path(entry).exists() or Path(f"{entry}_sft.json").exists()):
            continue  # a json/jsonl/parquet file, or a set of `tokenize --sft`: the loader's
        prefix = entry.removesuffix(".bin").removesuffix(".idx")
        bin_file, idx_file = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        if data.kind != "indexed" and prefix == entry and not (bin_file.exists()
                                                               or idx_file.exists()):
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


def record_problems(cfg: Config) -> list[str]:
    """The first record of each file of preference or unpaired data must be of that kind: pairs
    given to KTO, KTO's unpaired examples given to DPO or SFT conversations given to either are
    refused now, with what to do, rather than in every worker."""
    kind = cfg.data.kind
    if kind not in ("preference", "unpaired"):
        return []
    from llmtrain.data.sources import DataError, chunks, parse_chunk
    from llmtrain.rlhf.records import wrong_kind

    problems = []
    for entry in map(str, cfg.data.data_path):
        if entry in GENERATED or not Path(entry).exists():
            continue
        try:
            records = next((parse_chunk(c, skip_bad_lines=False).records
                            for c in chunks([entry])), [])
        except DataError as error:
            problems.append(str(error))
            continue
        problem = records and wrong_kind(records[0][1], kind, records[0][0])
        if problem:
            problems.append(problem)
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


def _same_folder(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def holds_steps(folder: Path) -> bool:
    """A Megatron checkpoint folder: iter_NNNNNNN/ or release/ folders inside."""
    return folder.is_dir() and any(_STEP.fullmatch(p.name) and p.is_dir()
                                   for p in folder.iterdir())


def is_hugging_face(folder: Path) -> bool:
    """A Hugging Face model folder (its config.json, no Megatron steps): checkpoint.load imports
    it (llmtrain.hf_load). A converted checkpoint carries config.json too, beside its steps."""
    return (folder / "config.json").is_file() and not holds_steps(folder)


def checkpoint_problems(cfg: Config) -> list[str]:
    """checkpoint.load must hold a checkpoint: a mistyped path would train from random weights.
    The save folder given as load (Megatron-LM's --load and --save of one folder) may be empty:
    the first run of a job starts fresh there."""
    ck = cfg.checkpoint
    if not ck.load or ck.resume == "never":
        return []
    load = Path(ck.load)
    save = Path(cfg.output_dir) / ck.save if ck.save else None
    if save is not None and _same_folder(load, save):
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
    if is_hugging_face(load):
        return []  # checked and imported by llmtrain.hf_load
    if not holds_steps(load):
        return [f"checkpoint.load={ck.load} holds no checkpoint (no iter_NNNNNNN or release "
                f"folder inside) and is not a Hugging Face model folder (no config.json), so "
                f"there is nothing to {what}: give the folder a training run saved into or "
                f"`python -m llmtrain.convert` wrote, or a Hugging Face model's folder "
                f"(config.json and its safetensors)"]
    return []


def disk_problems(cfg: Config, layout: Layout) -> list[str]:
    """Room for one checkpoint of the plan's size where the run saves, found now rather than
    at the first save, `save_interval` steps later."""
    if not cfg.checkpoint.save:
        return []
    folder = Path(cfg.output_dir) / cfg.checkpoint.save
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free, needed = shutil.disk_usage(existing).free, checkpoint_bytes(cfg, layout)
    if free >= needed:
        return []
    return [f"not enough free disk space for checkpoints in {folder}: one step of model "
            f"{cfg.model.name} takes about {needed / GIB:.2f} GiB and {free / GIB:.2f} GiB are "
            f"free; free some space, or save elsewhere (checkpoint.save=/a/larger/disk)"]


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def memory_shortfall(cfg: Config, layout: Layout) -> Optional[str]:
    """What the plan's memory estimate exceeds on this machine (None: it fits): the host's memory
    for all of this node's processes on a CPU, one GPU's for each GPU process."""
    per_process = memory_plan(cfg, layout).total
    count = layout.nproc_per_node
    if layout.device == "cpu":
        have = host_memory() / GIB
        if per_process * count <= have:
            return None
        return (f"the plan needs about {per_process:.1f} GiB per process x {count} process(es) "
                f"= {per_process * count:.1f} GiB of memory, but this machine has {have:.1f} "
                f"GiB: choose a smaller model (model=tiny), fewer processes (parallel=tp1pp1), "
                f"a smaller stage.micro_batch_size or data.seq_length, or a machine with GPUs")
    have = gpu_memory() / GIB
    if per_process <= have:
        return None
    return (f"the plan needs about {per_process:.1f} GiB per GPU, but each GPU here has "
            f"{have:.1f} GiB: raise parallel.tensor_model_parallel_size or "
            f"pipeline_model_parallel_size, set parallel.use_distributed_optimizer=true or "
            f"parallel.recompute_granularity=selective, or lower stage.micro_batch_size")


def problems(cfg: Config, layout: Layout, here: bool = True) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the files a launch reads and writes and, where its processes
    start on this machine (`here`), of its memory. A device set explicitly (device=cpu) insists:
    too little memory is then a warning."""
    found = (data_path_problems(cfg) + record_problems(cfg) + tokenizer_problems(cfg)
             + checkpoint_problems(cfg) + disk_problems(cfg, layout))
    warnings = []
    short = memory_shortfall(cfg, layout) if here else None
    if short and cfg.device == layout.device:
        warnings.append(f"warning: {short} (starting anyway: device={cfg.device} was given)")
    elif short:
        found.append(f"{short}; or add device={layout.device} to start anyway")
    return found, warnings
