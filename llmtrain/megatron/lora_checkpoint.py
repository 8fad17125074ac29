"""What a LoRA run's checkpoints say about their base model, and the check that resuming
them onto another base is refused.

An adapter-only step means nothing without the weights it was trained on: its descriptor
(llmtrain.json) records the base step's path and a hash of it (the SHA-256 of its integrity
manifest, which lists the SHA-256 of every file; of its dist_checkpointing metadata when it
has none), and a run whose base differs stops before loading anything.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

from llmtrain.config.schema import Config
from llmtrain.errors import RunStopped

MANIFESTS = ("integrity.json", ".metadata")


def base_step(cfg: Config) -> tuple[Path, int]:
    """(folder, step) of checkpoint.load that the adapters go onto: its latest complete step."""
    from llmtrain.megatron.checkpoint import latest_iteration, step_dir

    root = Path(cfg.checkpoint.load)
    step = latest_iteration(root)
    if step is None:
        raise RunStopped(f"peft=lora: checkpoint.load={root} holds no complete checkpoint of the "
                         f"base model; give a trained or converted model's checkpoint folder",
                         exit_code=2)
    return root, step


def identity(base: tuple[Path, int]) -> dict:
    from llmtrain.megatron.checkpoint import step_dir

    folder = step_dir(*base)
    for name in MANIFESTS:
        path = folder / name
        if path.is_file():
            return {"path": str(folder.resolve()), "sha256": hashlib.sha256(
                path.read_bytes()).hexdigest()}
    raise RunStopped(f"peft=lora: {folder} has no {' or '.join(MANIFESTS)}: it is no "
                     f"Megatron-Core checkpoint", exit_code=2)


def descriptor_entry(cfg: Config) -> dict:
    """What a LoRA run's step descriptor adds ({} for other runs)."""
    return {"base": identity(base_step(cfg))} if cfg.peft.name == "lora" else {}


def check_base(cfg: Config, stored: Optional[dict], folder: Path) -> None:
    """Refuse to load the adapter step `folder` onto a base other than its own."""
    if cfg.peft.name != "lora" or stored is None:
        return
    saved = stored.get("base")
    if saved is None:
        raise RunStopped(f"{folder} is no LoRA adapter checkpoint (its descriptor names no base "
                         f"model): resume it without peft=lora, or save this run elsewhere "
                         f"(checkpoint.save)", exit_code=2)
    current = identity(base_step(cfg))
    if saved["sha256"] != current["sha256"]:
        raise RunStopped(f"{folder} holds LoRA adapters trained on the base model "
                         f"{saved['path']} (sha256 {saved['sha256'][:12]}), but checkpoint.load "
                         f"gives {current['path']} (sha256 {current['sha256'][:12]}): set "
                         f"checkpoint.load to the base the adapters were trained on, or start a "
                         f"new run (another checkpoint.save)", exit_code=2)
