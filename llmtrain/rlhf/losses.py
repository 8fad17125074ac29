"""Alignment losses on per-sequence scores and per-token log-probabilities (plain torch)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo")


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Reward-model loss per pair: -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen.float() - rejected.float())


def preference(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               reference_chosen: torch.Tensor, reference_rejected: torch.Tensor, beta: float,
               loss_type: str) -> torch.Tensor:
    """DPO (sigmoid) or IPO loss per pair from the replies' log-probabilities (sums, or means
    when length-normalised) under the policy and the reference."""
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "ipo":
        return (h - 1.0 / (2.0 * beta)) ** 2
    raise ValueError(f"loss_type={loss_type} is not one of {', '.join(LOSS_TYPES)}")


def kl_estimate(logp: torch.Tensor, reference_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate on tokens sampled from the policy (Schulman's
    k3: exp(r) - 1 - r with r = ref - policy), never negative, 0 when both agree."""
    r = (reference_logp - logp).clamp(-20.0, 20.0)
    return torch.exp(r) - 1.0 - r


def clipped_policy(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                   clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token, and whether the clip was active (per token)."""
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def clipped_value(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                  clip: float) -> torch.Tensor:
    """PPO's clipped value loss per token: 0.5 x max of the plain and clipped squared errors."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
