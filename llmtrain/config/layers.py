"""Which layers of a model hold a mixture of experts (Megatron-Core's moe_layer_freq) and which
a sliding window (its window_attn_skip_freq), each read once, for validation, the parameter
count, the layer specs and the conversion alike (pure Python)."""

from __future__ import annotations


def moe_layers(m) -> list[bool]:
    """One flag per layer, True where it is a MoE layer (a dense model: none)."""
    if not m.num_moe_experts:
        return [False] * m.num_layers
    freq = m.moe_layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(m.num_layers)]
    return [bool(flag) for flag in freq]


def window_layers(m) -> list[bool]:
    """One flag per layer, True where its attention has the sliding window: every layer but
    each N-th (window_attn_skip_freq N, counted from 1 as Megatron-Core does), or as listed."""
    skip = m.window_attn_skip_freq
    if not m.window_size:
        return [False] * m.num_layers
    if skip is None:
        return [True] * m.num_layers
    if isinstance(skip, int):
        return [(i + 1) % skip != 0 for i in range(m.num_layers)]
    return [bool(flag) for flag in skip]


def moe_layer_problems(m) -> list[str]:
    """moe_layer_freq must be a positive step or one 0/1 per layer."""
    freq = m.moe_layer_freq
    if isinstance(freq, bool) or not isinstance(freq, int) and not _is_list(freq):
        return [f"model.moe_layer_freq={freq} must be a step (1: every layer MoE) or a list of "
                f"one 0 (dense) or 1 (MoE) per layer"]
    if isinstance(freq, int):
        return [] if freq >= 1 else [f"model.moe_layer_freq={freq} must be at least 1 (1: every "
                                     f"layer is a MoE layer)"]
    flags = list(freq)
    if len(flags) != m.num_layers or any(flag not in (0, 1) for flag in flags):
        return [f"model.moe_layer_freq has {len(flags)} entries {flags[:8]}"
                + ("..." if len(flags) > 8 else "") + f": give one 0 (dense) or 1 (MoE) for each "
                f"of the {m.num_layers} layers, e.g. [0, 1, 1, ...] for a dense first layer"]
    if not m.num_moe_experts and any(flags):
        return ["model.moe_layer_freq names MoE layers but model.num_moe_experts is not set: set "
                "it (the routed experts of each MoE layer), or leave moe_layer_freq at 1"]
    return []


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig"
