"""Advantages of sampled replies: GRPO's group-normalised rewards and PPO's GAE."""

from __future__ import annotations

import torch


def group_normalized(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); groups are consecutive rows. A group
    whose replies all score the same teaches nothing: its advantages are 0."""
    groups = rewards.float().reshape(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else \
        torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).reshape(-1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the reply tokens ([batch, tokens], mask 1 on the
    reply): advantages and returns (advantages + values), 0 off the mask."""
    mask = mask.float()
    advantages = torch.zeros_like(values, dtype=torch.float32)
    running = torch.zeros(values.size(0), dtype=torch.float32, device=values.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(values.size(1))):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m + running * (1 - m)
        advantages[:, t] = running * m
        next_value = values[:, t] * m + next_value * (1 - m)
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero mean, unit variance over the masked entries."""
    mask = mask.float()
    count = mask.sum().clamp(min=1.0)
    mean = (values * mask).sum() / count
    var = (((values - mean) * mask) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(var + eps) * mask
