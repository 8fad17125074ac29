"""checkpoint.load=<Hugging Face folder>: any stage starts from a Hugging Face model in one
command (docs/convert.md, "Training from a Hugging Face folder"); checkpoint.save_hf is the way
back (llmtrain/hf_save.py).

Before Hydra composes (`overrides`), so that the run's folder name and its saved config say it:
the folder (named on the command line or in its experiment's YAML) gives the model through its
config.json (the family registry, as `python -m llmtrain.convert` reads it) unless model= or the
experiment chooses one, the folder is the tokenizer
(with its chat template) unless one is given, and the run fine-tunes (weights only, a new
schedule). Once composed, `check_model` refuses a model that differs from the folder's. Before
any worker starts (`prepare`, in the command's own process, so that ranks never race for it) the
folder is converted by `python -m llmtrain.convert`, its per-layer check against transformers
included, into a cache folder keyed by the folder's files and the run's TP x PP; a second run, or
a resume, finds it there and pays nothing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import re
import shutil
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Optional

from llmtrain.config.inputs import is_hugging_face
from llmtrain.config.schema import Config, ModelConfig
from llmtrain.config.validate import ConfigError

# Bump when the conversion changes what it writes: earlier imports are then made again.
FORMAT = 1


def _given(args: list[str], key: str) -> bool:
    return any(re.fullmatch(rf"\+{{0,2}}{re.escape(key)}=.*", arg, re.S) for arg in args)


def _last(args: list[str], key: str) -> Optional[str]:
    values = [m.group(1) for m in (re.fullmatch(rf"\+{{0,2}}{re.escape(key)}=(.+)", a, re.S)
                                   for a in args) if m]
    return values[-1] if values else None


def experiment_settings(args: list[str]) -> dict:
    """The settings the command line's experiment= writes in its YAML (conf/experiment/, or a
    hydra.searchpath folder's experiment/), dotted, its chosen groups by group name: what it
    gives counts as given on the command line."""
    from omegaconf import OmegaConf

    from llmtrain.cli import CONF_DIR

    name = _last(args, "experiment")
    if name is None:
        return {}
    searched = [s.strip().removeprefix("file://") for s in
                (_last(args, "hydra.searchpath") or "").strip("[]").split(",") if s.strip()]
    found = [f for f in (Path(d) / "experiment" / f"{name}.yaml" for d in [*searched, CONF_DIR])
             if f.is_file()]
    if not found:
        return {}  # Hydra says it is missing
    node = OmegaConf.to_container(OmegaConf.load(found[0]), resolve=False)
    settings = {}
    for entry in node.pop("defaults", None) or []:
        if isinstance(entry, dict):
            settings.update((k.removeprefix("override").strip(" /"), v) for k, v in entry.items())

    def flatten(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                flatten(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            settings[prefix] = value

    flatten("", node)
    return settings


def hf_folder(args: list[str], experiment: Optional[dict] = None) -> Optional[Path]:
    """The Hugging Face folder that checkpoint.load names (the command line's, else its
    experiment's), if it is one."""
    value = _last(args, "checkpoint.load")
    if value is None:
        value = (experiment or {}).get("checkpoint.load")
    folder = Path(value).expanduser() if isinstance(value, str) and "${" not in value else None
    return folder.resolve() if folder is not None and is_hugging_face(folder) else None


@cache
def folder_model(folder: str) -> ModelConfig:
    """The model of a Hugging Face folder's config.json, or a ConfigError naming what the folder
    lacks or the architecture that does not convert."""
    from llmtrain.convert import families, hf_files
    from llmtrain.convert.mapping import ConversionError
    from llmtrain.convert.plan import hf_model

    path = Path(folder)
    missing = hf_files.missing_files(path)
    if missing:
        raise ConfigError([f"checkpoint.load={folder}: the Hugging Face model folder lacks: "
                           f"{', '.join(missing)}"])
    try:
        return hf_model(path)[2]
    except ConversionError as error:
        raise ConfigError([f"checkpoint.load={folder}: {error}"]) from None
    except (ValueError, OSError) as error:  # a model_type transformers does not know
        raise ConfigError([f"checkpoint.load={folder}: transformers cannot read its config.json "
                           f"({str(error).splitlines()[0]}); supported architectures: "
                           f"{families.supported()}"]) from None


def _offer(model: ModelConfig) -> str:
    """Make the folder's model a `model` option (named after the folder; hf_<name> where a
    conf/model entry has that name)."""
    from hydra.core.config_store import ConfigStore

    from llmtrain.cli import CONF_DIR

    name = model.name
    if (Path(CONF_DIR) / "model" / f"{name}.yaml").exists():
        name = f"hf_{name}"
    ConfigStore.instance().store(group="model", name=name,
                                 node=dataclasses.replace(model, name=name))
    return name


def overrides(args: list[str]) -> tuple[list[str], list[str]]:
    """(`args` with what a Hugging Face checkpoint.load implies added, the added overrides): the
    folder's model unless model= (or the experiment) chooses one, the folder as tokenizer unless
    another is given, and finetune=true unless given. Raises ConfigError on a bad folder."""
    experiment = experiment_settings(args)
    folder = hf_folder(args, experiment)
    if folder is None:
        return args, []

    def given(key: str) -> bool:
        return _given(args, key) or key in experiment

    model = folder_model(str(folder))
    added = []
    if not given("model"):
        added.append(f"model={_offer(model)}")
    kind = _last(args, "data.tokenizer.tokenizer_type") or experiment.get(
        "data.tokenizer.tokenizer_type")
    if not given("data.tokenizer.tokenizer_model") and kind in (None, "huggingface"):
        if kind is None:
            added.append("data.tokenizer.tokenizer_type=huggingface")
        added.append(f"data.tokenizer.tokenizer_model={folder}")
    if not given("checkpoint.finetune"):
        added.append("checkpoint.finetune=true")
    return [*args, *added], added


def _loaded_folder(cfg: Config) -> Optional[Path]:
    load = cfg.checkpoint.load
    return Path(load).resolve() if load and is_hugging_face(Path(load)) else None


def check_model(cfg: Config) -> None:
    """The model of a run that loads a Hugging Face folder must be the folder's (a model= or
    experiment= beside it, a model.*= override): a ConfigError names each differing field."""
    folder = _loaded_folder(cfg)
    if folder is None:
        return
    from llmtrain.convert.mapping import ConversionError
    from llmtrain.convert.plan import disagreement

    try:
        disagreement(cfg.model, folder_model(str(folder)), str(folder / "config.json"))
    except ConversionError as error:
        raise ConfigError([str(error)]) from None


# Beside each import: the folder and layout it was made from (what pruning goes by).
SOURCE = "llmtrain_import.json"


def import_dir(cfg: Config) -> Path:
    """checkpoint.hf_import_dir, else beside llmtrain's other caches (the corpus)."""
    from llmtrain.data.corpus import cache_root

    return Path(cfg.checkpoint.hf_import_dir or cache_root() / "hf_import")


def cache_key(folder: Path, tp: int, pp: int) -> str:
    """What an import depends on: the folder's files by name, size and modification time (hashing
    a 100 GB model would take minutes), the layout it is converted under (Megatron pads the
    vocabulary to a multiple of TP) and the converter's versions."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith("."))
    identity = {"files": files, "tensor_model_parallel_size": tp,
                "pipeline_model_parallel_size": pp, "format": FORMAT,
                "versions": [metadata.version(d) for d in ("megatron-core", "transformers")]}
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def _convert(folder: Path, target: Path, tp: int, pp: int) -> None:
    """`python -m llmtrain.convert` into `target`, in place once it passed its check."""
    from llmtrain.hf_save import convert_into

    print(f"[llmtrain] checkpoint.load={folder} is a Hugging Face folder: converting it (once) "
          f"into {target}", flush=True)

    def echo(line: str) -> None:
        # Its closing hint (a training command for the folder) is this command's own job.
        if not line.startswith("[convert] train from it:"):
            print(line, end="", flush=True)

    failed = convert_into(target, f"input={folder}", f"tensor_model_parallel_size={tp}",
                          f"pipeline_model_parallel_size={pp}", echo=echo)
    if failed:
        raise ConfigError([f"checkpoint.load={folder}: the conversion failed (python -m "
                           f"llmtrain.convert, {failed.splitlines()[0].rstrip(':')}; its output "
                           f"is above)"])
    (target / SOURCE).write_text(json.dumps({"folder": str(folder),
                                             "tensor_model_parallel_size": tp,
                                             "pipeline_model_parallel_size": pp}) + "\n")


def _prune(entry: Path) -> None:
    """Remove the other entries of the import cache of `entry`'s folder and layout: made from
    older files of that folder, or by another version of the converter, they are never used
    again (a 70B model's import is 140 GB)."""
    source = (entry / SOURCE).read_text()
    for other in sorted(entry.parent.iterdir()):
        if other != entry and (other / SOURCE).is_file() and \
                (other / SOURCE).read_text() == source:
            print(f"[llmtrain] removing {other}: an import of the same folder at the same "
                  f"layout, from before its files (or llmtrain's converter) changed", flush=True)
            shutil.rmtree(other, ignore_errors=True)


def prepare(cfg: Config) -> None:
    """Point a run whose checkpoint.load is a Hugging Face folder at its conversion: made now,
    or found in the import cache. Safe when several commands ask at once."""
    folder = _loaded_folder(cfg)
    if folder is None:
        return
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    model = folder_model(str(folder))
    target = import_dir(cfg) / f"{model.name}-{cache_key(folder, tp, pp)}"
    if target.is_dir():
        print(f"[llmtrain] checkpoint.load={folder}: converted and checked before, loading "
              f"{target}", flush=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / f".{target.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.is_dir():
                _convert(folder, target, tp, pp)
    _prune(target)
    cfg.checkpoint.load = str(target)
