"""Megatron-LM checkpoints in the torch format (what Pai-Megatron-Patch and Megatron-LM write
without --ckpt-format torch_dist):

    <root>/latest_checkpointed_iteration.txt          a step number, or "release"
    <root>/iter_0000100/mp_rank_00/model_optim_rng.pt  one file per TP rank (PP = 1) ...
    <root>/iter_0000100/mp_rank_00_001/...             ... or per TP and PP rank
    <root>/release/mp_rank_00/model_optim_rng.pt       converted models

Each file holds the training arguments (`args`) and its rank's slice of a Megatron-Core GPT model
(`model`, names as in Megatron-Core with local or Transformer Engine layers). The files are read
with pickle, as Megatron-LM itself does: convert only checkpoints you trust.
"""

from __future__ import annotations

import pickle
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmtrain.convert.mapping import ConversionError

TRACKER = "latest_checkpointed_iteration.txt"
FILE_NAMES = ("model_optim_rng.pt", "model_rng.pt")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
# Transformer Engine fuses the norms into the next linear layer; Megatron's local layers keep them
# apart (llmtrain builds those on CPU).
_TE_NAMES = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".self_attention.linear_qkv.layer_norm_bias": ".input_layernorm.bias",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_bias": ".pre_mlp_layernorm.bias",
}


@dataclass(frozen=True)
class LegacyCheckpoint:
    """One step of a Megatron-LM checkpoint: its folder and file per (TP rank, PP rank)."""

    folder: str
    iteration: str  # a step number or "release"
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    files: dict  # (tp, pp) -> path

    def file(self, tp: int, pp: int) -> str:
        return self.files[(tp, pp)]


def is_legacy(root: Path) -> bool:
    """Whether a folder is a Megatron-LM torch-format checkpoint (rank folders in its step)."""
    try:
        return any(_RANK_DIR.match(p.name) for p in _step_folder(root).iterdir())
    except (ConversionError, OSError):
        return False


def _step_folder(root: Path) -> Path:
    tracker = root / TRACKER
    if not tracker.exists():
        raise ConversionError(f"{root} has no {TRACKER}: point input= at the folder that holds "
                              f"it (the checkpoint's save folder)")
    text = tracker.read_text().strip()
    folder = root / ("release" if text == "release" else f"iter_{int(text):07d}")
    if not folder.is_dir():
        raise ConversionError(f"{TRACKER} names step {text}, but {folder.name}/ is missing "
                              f"from {root}: copy that step too, or write the step that is "
                              f"there into {TRACKER}")
    return folder


def find(root: Path) -> LegacyCheckpoint:
    """The latest step of a Megatron-LM checkpoint; every rank file it needs must be present."""
    folder = _step_folder(root)
    ranks = {}
    for path in folder.iterdir():
        match = _RANK_DIR.match(path.name)
        if match:
            ranks[(int(match.group(1)), int(match.group(2) or 0))] = path
    if not ranks:
        raise ConversionError(f"{folder} has no mp_rank_XX folders: it is not a Megatron-LM "
                              f"torch-format checkpoint (for a Megatron-Core checkpoint use "
                              f"direction=mcore_to_hf)")
    tp = max(t for t, _ in ranks) + 1
    pp = max(p for _, p in ranks) + 1
    files, missing = {}, []
    for t in range(tp):
        for p in range(pp):
            rank_dir = folder / (f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}")
            file = next((rank_dir / n for n in FILE_NAMES if (rank_dir / n).exists()), None)
            if file is None:
                missing.append(f"{rank_dir.relative_to(root)}/{FILE_NAMES[0]}")
            else:
                files[(t, p)] = str(file)
    if missing:
        raise ConversionError(f"the checkpoint at {root} lacks {len(missing)} file(s): "
                              + ", ".join(missing) + ": copy every rank's file of the step")
    return LegacyCheckpoint(str(folder), folder.name, tp, pp, files)


class _TolerantUnpickler(pickle.Unpickler):
    """Megatron-LM pickles its argparse Namespace, which may name classes of packages not
    installed here (megatron.training enums, tokenizers): those load as empty stand-ins."""

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (), {"__init__": lambda self, *a, **k: None,
                                   "__setstate__": lambda self, state: None,
                                   "__reduce__": lambda self: (type(self), ())})


_pickle = types.ModuleType("llmtrain_tolerant_pickle")
_pickle.Unpickler = _TolerantUnpickler
_pickle.load = pickle.load


def read(path: str) -> dict[str, Any]:
    """A rank file, memory-mapped (its optimizer state is never read into memory)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=False,
                      pickle_module=_pickle)


def model_state(checkpoint: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """The rank's model tensors under the names of Megatron-Core's local layers."""
    if "model" not in checkpoint:
        found = ", ".join(k for k in checkpoint if k.startswith("model")) or "none"
        raise ConversionError(f"{path} has no 'model' entry (found: {found}); checkpoints with "
                              f"virtual pipeline stages are not supported yet")
    state = {}
    for name, value in checkpoint["model"].items():
        if name.startswith("language_model."):
            raise ConversionError(f"{path} holds Megatron-LM's legacy (non-core) GPT model "
                                  f"(language_model.*): only Megatron-Core models convert")
        if "_extra_state" in name:
            continue
        for te, local in _TE_NAMES.items():
            if name.endswith(te):
                name = name[:-len(te)] + local
        state[name] = value
    return state


def model_fields(args) -> dict:
    """ModelConfig fields from Megatron-LM's training arguments."""
    def arg(name, default=None):
        value = getattr(args, name, None)
        return default if value is None else value

    heads, hidden = args.num_attention_heads, args.hidden_size
    groups = arg("num_query_groups") if arg("group_query_attention", False) else None
    kv_channels = arg("kv_channels")
    problems = []
    if arg("num_experts"):
        problems.append("mixture of experts (num_experts)")
    if arg("squared_relu", False):
        problems.append("squared ReLU")
    if problems:
        raise ConversionError("this Megatron-LM checkpoint uses what llmtrain cannot convert yet: "
                              + "; ".join(problems))
    position = arg("position_embedding_type", "learned_absolute")
    swiglu = arg("swiglu", False)
    normalization = arg("normalization", "LayerNorm")
    return {
        "family": _guess_family(swiglu, normalization, position, arg("add_qkv_bias", False),
                                arg("add_bias_linear", True), arg("qk_layernorm", False)),
        "num_layers": args.num_layers,
        "hidden_size": hidden,
        "ffn_hidden_size": arg("ffn_hidden_size", 4 * hidden),
        "num_attention_heads": heads,
        "num_query_groups": None if groups in (None, heads) else groups,
        "kv_channels": None if kv_channels in (None, hidden // heads) else kv_channels,
        "vocab_size": args.padded_vocab_size,
        "make_vocab_size_divisible_by": arg("make_vocab_size_divisible_by", 128),
        "max_position_embeddings": args.max_position_embeddings,
        "normalization": normalization,
        "layernorm_epsilon": arg("norm_epsilon", arg("layernorm_epsilon", 1e-5)),
        "activation": "swiglu" if swiglu else ("gelu_tanh" if arg("openai_gelu", False)
                                               else "gelu"),
        "add_bias_linear": arg("add_bias_linear", True),
        "add_qkv_bias": arg("add_qkv_bias", False),
        "qk_layernorm": bool(arg("qk_layernorm", False)),
        "position_embedding_type": position,
        "rotary_base": int(arg("rotary_base", 10000)),
        "rotary_percent": float(arg("rotary_percent", 1.0)),
        "rope_scaling": bool(arg("use_rope_scaling", False)),
        "rope_scaling_factor": float(arg("rope_scaling_factor", 8.0)),
        "share_embeddings_and_output_weights": not arg("untie_embeddings_and_output_weights",
                                                       False),
    }


def _guess_family(swiglu, normalization, position, qkv_bias, bias, qk_layernorm) -> str:
    """The Hugging Face family a Megatron-LM model most likely came from (model= overrides)."""
    if position == "learned_absolute" and normalization == "LayerNorm":
        return "gpt2"
    if swiglu and normalization == "RMSNorm":
        if qk_layernorm:
            return "qwen3"
        return "qwen2" if qkv_bias and not bias else "llama"
    return "llama"
