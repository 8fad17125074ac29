"""Alignment losses on per-sequence scores and per-token log-probabilities (plain torch), each a
small function registered under the name a config chooses it by:

- PREFERENCE_LOSSES (stage.alignment.loss_type, stage=dpo): sigmoid (DPO), ipo, and the
  reference-free simpo and orpo (no reference model is loaded for them);
- kto (stage=kto): unpaired desirable and undesirable completions against a reference point;
- POLICY_LOSSES (stage.alignment.policy_loss, grpo/ppo): vanilla (PPO's token-level clipped
  ratio) and gspo (one importance ratio per sequence);
- LOSS_AGGREGATIONS (stage.alignment.loss_agg_mode): how token losses become the step's loss;
- KL_ESTIMATORS (stage.alignment.kl_estimator): Schulman's k1, k2, k3.

Names follow verl's (loss_mode, loss_agg_mode, clip_ratio_low/high) and TRL's (loss_type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def bradley_terry(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Reward-model loss per pair: -log sigmoid(r_chosen - r_rejected)."""
    return -F.logsigmoid(chosen.float() - rejected.float())


# Preference losses: (policy chosen, policy rejected, reference chosen, reference rejected,
# alignment settings) -> loss per pair, from the replies' log-probabilities (sums, or means
# where length-normalised; None for the reference of a reference-free loss).


@dataclass(frozen=True)
class PreferenceLoss:
    fn: Callable
    uses_reference: bool = True
    # True: the loss is defined on mean token log-probabilities (whatever length_normalized).
    length_normalized: bool = False


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {}


def preference_loss(name: str, **kind):
    def add(fn):
        PREFERENCE_LOSSES[name] = PreferenceLoss(fn, **kind)
        return fn
    return add


def _margin(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


@preference_loss("sigmoid")
def dpo(pc, pr, rc, rr, a) -> torch.Tensor:
    """DPO: -log sigmoid(beta x the policy's margin over the reference's)."""
    return -F.logsigmoid(a.beta * _margin(pc, pr, rc, rr))


@preference_loss("ipo")
def ipo(pc, pr, rc, rr, a) -> torch.Tensor:
    """IPO: the margin regressed onto 1 / (2 beta)."""
    return (_margin(pc, pr, rc, rr) - 1.0 / (2.0 * a.beta)) ** 2


@preference_loss("simpo", uses_reference=False, length_normalized=True)
def simpo(pc, pr, rc, rr, a) -> torch.Tensor:
    """SimPO: -log sigmoid(beta (mean logp chosen - mean logp rejected) - simpo_gamma)."""
    return -F.logsigmoid(a.beta * (pc - pr) - a.simpo_gamma)


def _log_odds(mean_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(mean log-probability), stable for p near 1."""
    mean_logp = mean_logp.clamp(max=-1e-6)
    return mean_logp - torch.log(-torch.expm1(mean_logp))


@preference_loss("orpo", uses_reference=False, length_normalized=True)
def orpo(pc, pr, rc, rr, a) -> torch.Tensor:
    """ORPO: the chosen reply's NLL plus beta x -log sigmoid(log odds ratio chosen/rejected)."""
    return -pc - a.beta * F.logsigmoid(_log_odds(pc) - _log_odds(pr))


def preference(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
               settings) -> torch.Tensor:
    """The loss per pair of settings.loss_type (a registered preference loss)."""
    return PREFERENCE_LOSSES[settings.loss_type].fn(policy_chosen, policy_rejected,
                                                    reference_chosen, reference_rejected,
                                                    settings)


def kto(policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor,
        reference_point: torch.Tensor, a) -> torch.Tensor:
    """KTO's loss per example (Ethayarajh et al. 2024), from the completions' log-probabilities:
    desirable_weight x (1 - sigmoid(beta (log-ratio - z0))) for a desirable completion,
    undesirable_weight x (1 - sigmoid(beta (z0 - log-ratio))) for an undesirable one, with z0
    the reference point (kto_reference_point)."""
    margin = a.beta * (policy.float() - reference.float() - reference_point)
    return torch.where(desirable, a.desirable_weight * (1.0 - torch.sigmoid(margin)),
                       a.undesirable_weight * (1.0 - torch.sigmoid(-margin)))


def kto_reference_point(mismatched_log_ratio_sum: torch.Tensor, count) -> torch.Tensor:
    """KTO's z0: the batch's mean log-ratio of policy to reference on mismatched prompts and
    completions (an estimate of KL(policy || reference)), at least 0, and no gradient through
    it."""
    return (mismatched_log_ratio_sum.detach().float() / count).clamp(min=0.0)


# KL estimators of KL(policy || reference) per token, on tokens sampled from the policy.

def _log_ratio(logp, reference_logp):
    return (logp - reference_logp).clamp(-20.0, 20.0)


KL_ESTIMATORS: dict[str, Callable] = {
    # log(pi / ref): unbiased, may be negative.
    "k1": lambda logp, ref: _log_ratio(logp, ref),
    # 0.5 log(pi / ref)^2: biased, low variance, never negative.
    "k2": lambda logp, ref: 0.5 * _log_ratio(logp, ref) ** 2,
    # ref/pi - 1 - log(ref/pi): unbiased, never negative, 0 when both agree.
    "k3": lambda logp, ref: torch.exp(-_log_ratio(logp, ref)) - 1.0 + _log_ratio(logp, ref),
}


def kl_estimate(logp: torch.Tensor, reference_logp: torch.Tensor, estimator: str = "k3"
                ) -> torch.Tensor:
    return KL_ESTIMATORS[estimator](logp, reference_logp)


# Policy losses: (logp, old logp, advantages, mask [batch, tokens], clip low, clip high) ->
# (loss per token, clip active per token, importance ratio per token).

POLICY_LOSSES: dict[str, Callable] = {}


def policy_loss(name: str):
    def add(fn):
        POLICY_LOSSES[name] = fn
        return fn
    return add


def _clipped(ratio, advantages, low, high):
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - low, 1.0 + high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


@policy_loss("vanilla")
def token_ratio(logp, old_logp, advantages, mask, low, high):
    """PPO's clipped surrogate with one ratio per token (DAPO's decoupled range: low != high)."""
    ratio = torch.exp(logp - old_logp)
    loss, clipped = _clipped(ratio, advantages, low, high)
    return loss, clipped, ratio.detach()


@policy_loss("gspo")
def sequence_ratio(logp, old_logp, advantages, mask, low, high):
    """GSPO: one ratio per sequence, exp(mean of its tokens' log-ratios), clipped as a whole;
    each token carries it (value of the sequence's, gradient through its own log-probability,
    GSPO-token), so that a token mean per sequence gives GSPO's gradient."""
    mask = mask.float()
    per_sequence = ((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    ratio = torch.exp(per_sequence.detach()[:, None] + logp - logp.detach())
    loss, clipped = _clipped(ratio, advantages, low, high)
    return loss, clipped, ratio.detach()


# Aggregations: (loss per token, mask, max reply length) -> (loss sum, count); the schedule
# divides the step's summed losses by the summed counts.

def _sequences(mask):
    return (mask.sum(1) > 0).sum()


LOSS_AGGREGATIONS: dict[str, Callable] = {
    # Every token of the batch weighs the same (DAPO's token-level loss).
    "token-mean": lambda loss, mask, max_len: ((loss * mask).sum(), mask.sum()),
    # Each sequence's token mean, then the mean over sequences (the GRPO paper's).
    "seq-mean-token-mean": lambda loss, mask, max_len: (
        ((loss * mask).sum(1) / mask.sum(1).clamp(min=1.0)).sum(), _sequences(mask)),
    # Token sums over a constant (the longest reply allowed), then the mean over sequences: no
    # length normalisation (Dr. GRPO).
    "seq-mean-token-sum-norm": lambda loss, mask, max_len: (
        (loss * mask).sum() / max_len, _sequences(mask)),
}


def clipped_value(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                  clip: float) -> torch.Tensor:
    """PPO's clipped value loss per token: 0.5 x max of the plain and clipped squared errors."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
