"""Datasets from the local Hugging Face Hub cache: a data.data_path entry
`hf://datasets/<org>/<name>` (or `...<name>@<revision>`) is the snapshot that
`huggingface-cli download --repo-type dataset <org>/<name>` put in the cache ($HF_HUB_CACHE,
~/.cache/huggingface/hub), read as a folder of shards (llmtrain.data.hf_datasets). Nothing is
downloaded: training machines are often offline, and a run must not depend on the network."""

from __future__ import annotations

import dataclasses

from llmtrain.config.schema import Config
from llmtrain.config.validate import ConfigError

PREFIX = "hf://datasets/"


def local_snapshot(entry: str) -> str:
    """The cached snapshot folder of a hf://datasets/ entry."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, revision = entry.removeprefix(PREFIX).partition("@")
    try:
        return snapshot_download(repo, repo_type="dataset", revision=revision or None,
                                 local_files_only=True)
    except LocalEntryNotFoundError:
        raise ConfigError([f"data.data_path entry {entry}: the dataset is not in the local "
                           f"Hugging Face cache; download it first: huggingface-cli download "
                           f"--repo-type dataset {repo}"
                           + (f" --revision {revision}" if revision else "")]) from None


def resolve_hub_datasets(cfg: Config) -> Config:
    """cfg with its hf://datasets/ entries of data.data_path replaced by their cached folders
    (a weight before an entry, as in a blend, stays)."""
    paths = [local_snapshot(str(p)) if str(p).startswith(PREFIX) else p
             for p in cfg.data.data_path]
    if paths != list(cfg.data.data_path):
        cfg.data = dataclasses.replace(cfg.data, data_path=paths)
    return cfg
