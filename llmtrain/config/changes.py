"""What may change between a checkpoint and the run that resumes it.

Every checkpoint stores the resolved config it was trained with, next to the tokenizer's identity
(llmtrain.json). On resume, fields that only steer the rest of the run may change freely: the
learning-rate schedule, the length, intervals, logging, the launcher, and the parallel layout
(dist_checkpointing reshards). Any other difference (model shape, data, tokenizer, batch size,
precision, seed) changes what is being trained: it is refused, shown as a diff, unless the user
names the field in `checkpoint.allow_config_change`. Pure Python: validation uses it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Keys, or groups of keys (a prefix up to a dot), that may differ without being named.
CHANGEABLE = (
    "name", "output_dir", "dry_run", "device", "parallel", "launcher", "logging", "checkpoint",
    "stage.train_iters", "stage.train_tokens", "stage.exit_interval", "stage.eval_interval",
    "stage.eval_iters", "stage.micro_batch_size", "optim.lr", "optim.min_lr",
    "optim.lr_warmup_iters", "optim.lr_warmup_tokens", "optim.lr_decay_style",
    "optim.lr_decay_iters", "optim.lr_decay_tokens", "optim.lr_wsd_decay_iters",
    "optim.lr_wsd_decay_tokens",
    "optim.lr_wsd_decay_style", "optim.weight_decay", "optim.clip_grad",
    "optim.check_for_nan_in_loss_and_grad", "optim.on_nonfinite", "model.hidden_dropout",
    "model.attention_dropout", "model.init_method_std", "precision.gradient_accumulation_fusion",
    "precision.use_te_op_fuser",
    "data.num_workers", "data.data_cache_path",
    # The alignment roles' own layouts (dist_checkpointing reshards the critic's too).
    "stage.alignment.reference_tensor_model_parallel_size",
    "stage.alignment.reward_tensor_model_parallel_size",
    "stage.alignment.critic_tensor_model_parallel_size",
    # Where the critic is served: the server resumes the critic's own steps.
    "stage.alignment.critic_url",
    # Where the tokenizer's files are: what they hold is compared as tokenizer.identity.
    "data.tokenizer.tokenizer_model", "data.tokenizer.vocab_file", "data.tokenizer.merge_file",
)
# Changes not worth a note when resuming (the parallel layout gets its own message).
QUIET = ("name", "output_dir", "dry_run", "device", "parallel", "launcher", "logging", "checkpoint")
# Starting a fine-tuning run from a checkpoint's weights: only these must match.
WEIGHTS = ("model", "tokenizer")


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"hidden_size": 256}} -> {"model.hidden_size": 256}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def covers(entry: str, key: str) -> bool:
    return key == entry or key.startswith(entry + ".")


def compare(stored: dict, current: dict, allowed: list[str],
            weights_only: bool = False) -> tuple[list[Change], list[Change]]:
    """(changes that may happen, changes refused) between two nested configs.

    Keys only one side has are not changes: they come from another llmtrain version, and the
    run uses its own default for them."""
    old, new = flatten(stored), flatten(current)
    accepted, refused = [], []
    for key in sorted(old.keys() & new.keys()):
        if old[key] == new[key]:
            continue
        change = Change(key, old[key], new[key])
        if weights_only and not any(covers(entry, key) for entry in WEIGHTS):
            continue
        if any(covers(entry, key) for entry in (*CHANGEABLE, *allowed)):
            accepted.append(change)
        else:
            refused.append(change)
    return accepted, refused


def refusal(source: str, refused: list[Change], allowed: list[str]) -> str:
    lines = "\n".join(f"    {change}" for change in refused)
    # The tokenizer's identity is one thing to allow, however many of its fields differ.
    keys = ("tokenizer" if covers("tokenizer", c.key) else c.key for c in refused)
    names = ",".join(dict.fromkeys([*allowed, *keys]))
    return (f"cannot resume from {source}: the configuration differs from the checkpoint's in "
            f"what is being trained (checkpoint -> now):\n{lines}\n"
            f"  Restore these values, start the new experiment in another folder "
            f"(hydra.run.dir=...), or, if you know the change is safe, allow it:\n"
            f"    checkpoint.allow_config_change=[{names}]")


def unknown_entries(entries: list[str], config: dict) -> list[str]:
    """Entries of checkpoint.allow_config_change that name no config field or group."""
    keys = [*flatten(config), "tokenizer.identity", "tokenizer.vocab_size", "tokenizer.type"]
    return [entry for entry in entries if not any(covers(entry, key) for key in keys)]
