"""Advantage estimators of sampled replies, registered under the names
stage.alignment.advantage_estimator chooses them by (verl's): grpo (group-normalised rewards;
Dr. GRPO without the std), rloo (leave-one-out baseline), reinforce_plus_plus (returns whitened
over the batch) and gae (PPO's, from a critic's values).

Each takes the per-token rewards [batch, tokens] (the reply's score at its last token, minus
kl_coef x KL on every token when the KL is a reward penalty), the reply mask, the critic's
values (gae) and the settings, and gives per-token advantages and returns (None without a
critic)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Estimator:
    fn: Callable
    needs_values: bool = False  # a critic (stage=ppo)
    needs_groups: bool = False  # several replies per prompt (group_size >= 2)


ESTIMATORS: dict[str, Estimator] = {}


def estimator(name: str, **kind):
    def add(fn):
        ESTIMATORS[name] = Estimator(fn, **kind)
        return fn
    return add


def group_normalized(rewards: torch.Tensor, group_size: int, eps: float = 1e-6,
                     by_std: bool = True) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps); groups are consecutive rows. A group
    whose replies all score the same teaches nothing: its advantages are 0. by_std=False: only
    the mean is taken off (Dr. GRPO)."""
    groups = rewards.float().reshape(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    if not by_std:
        return (groups - mean).reshape(-1)
    std = groups.std(dim=1, keepdim=True, unbiased=False) if group_size > 1 else \
        torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).reshape(-1)


def leave_one_out(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """r minus the mean of the other replies of its group (RLOO)."""
    groups = rewards.float().reshape(-1, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


@estimator("grpo", needs_groups=True)
def grpo(token_rewards, mask, values, a):
    sequence = group_normalized(token_rewards.sum(1), a.group_size, by_std=a.norm_adv_by_std)
    return sequence[:, None] * mask, None


@estimator("rloo", needs_groups=True)
def rloo(token_rewards, mask, values, a):
    return leave_one_out(token_rewards.sum(1), a.group_size)[:, None] * mask, None


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float
                       ) -> torch.Tensor:
    """sum over t' >= t of gamma^(t'-t) r_t' on the reply tokens, 0 off the mask."""
    returns = torch.zeros_like(token_rewards, dtype=torch.float32)
    running = torch.zeros(token_rewards.size(0), dtype=torch.float32,
                          device=token_rewards.device)
    for t in reversed(range(token_rewards.size(1))):
        running = token_rewards[:, t] + gamma * running
        returns[:, t] = running * mask[:, t]
    return returns


@estimator("reinforce_plus_plus")
def reinforce_plus_plus(token_rewards, mask, values, a):
    """REINFORCE++: discounted returns, whitened over the batch (this replica's rollouts)."""
    return whiten(discounted_returns(token_rewards, mask, a.gamma), mask), None


@estimator("gae", needs_values=True)
def gae_whitened(token_rewards, mask, values, a):
    adv, returns = gae(token_rewards, values, mask, a.gamma, a.lam)
    return whiten(adv, mask), returns


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
