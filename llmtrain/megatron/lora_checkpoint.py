"""What a LoRA run's checkpoints say about their base model, and the check that resuming
them onto another base is refused.

An adapter-only step means nothing without the weights it was trained on: its descriptor
(llmtrain.json) records the base step's path and a hash of it (the SHA-256 of its integrity
manifest, which lists the SHA-256 of every file; of its dist_checkpointing metadata when it
has none), and a run whose base differs stops before loading anything.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from llmtrain.config.schema import Config, PeftConfig
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


def adapter_of(root: Path, iteration: int) -> Optional[tuple[str, PeftConfig]]:
    """(base step folder, LoRA settings) of a peft=lora run's step; None for a whole model.
    ValueError when the base is gone or no longer the one the adapters were trained on."""
    from llmtrain.megatron.checkpoint import DESCRIPTOR, step_dir

    path = step_dir(root, iteration) / DESCRIPTOR
    descriptor = json.loads(path.read_text()) if path.exists() else {}
    if "base" not in descriptor:
        return None
    base = Path(descriptor["base"]["path"])
    manifest = next((base / n for n in MANIFESTS if (base / n).is_file()), None)
    if manifest is None or hashlib.sha256(manifest.read_bytes()).hexdigest() != descriptor[
            "base"]["sha256"]:
        raise ValueError(f"{path.parent} holds LoRA adapters of the base model {base}, which is "
                         f"missing or has changed since: restore that checkpoint")
    return str(base), PeftConfig(**descriptor["config"]["peft"])


def load_with_adapters(root, iteration: int, chunks: list, base: str, peft: PeftConfig) -> None:
    """Collective: the base step into freshly built chunks, then the adapters of `iteration` of
    `root` beside it (llmtrain.megatron.lora)."""
    from llmtrain.megatron import checkpoint, lora

    base = Path(base)
    step = 0 if base.name == "release" else int(base.name.removeprefix("iter_"))
    checkpoint.load(base.parent, step, chunks, None, None, weights_only=True)
    lora.add_adapters(chunks, peft, 0)
    checkpoint.load(root, iteration, chunks, None, None, weights_only=True)


def load_merged(root, iteration: int, chunks: list) -> None:
    """Collective: a step's weights into freshly built chunks to run, not train (generation, a
    frozen reward model): a whole model's as they are, a peft=lora run's as its base with the
    adapters (and scalar head) merged in."""
    from llmtrain.megatron import checkpoint, lora

    adapter = adapter_of(Path(root), iteration)
    if adapter is None:
        checkpoint.load(root, iteration, chunks, None, None, weights_only=True)
    else:
        load_with_adapters(root, iteration, chunks, *adapter)
        lora.merge(chunks)


def load_peft(chunks: list, folder: str) -> None:
    """A PEFT adapter folder's tensors into freshly attached adapters (every rank its shard, as
    the export gathers them: llmtrain.convert.peft.hf_name maps the names both ways). A part it
    does not have (k of a q,v-only adapter on the fused qkv) gets zeros: it adds nothing, and its
    gradients stay zero."""
    import torch
    from safetensors.torch import load_file

    from llmtrain.convert.peft import WEIGHTS, hf_name
    from llmtrain.megatron import lora
    from llmtrain.megatron.weights import global_names, shard, tensor_group

    tensors = load_file(str(Path(folder) / WEIGHTS))
    with torch.no_grad():
        for chunk in chunks:
            names, tp = global_names(chunk), tensor_group(chunk)
            for local, param in chunk.named_parameters():
                if lora.is_adapter_key(local):
                    full = tensors.get(hf_name(names[local]))
                    param.copy_(torch.zeros_like(param) if full is None else
                                shard(full.to(param.device, torch.float32), param, False, tp))
