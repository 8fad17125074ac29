"""Rewards of generated replies: rules, and beside them a reward model's or a reward server's
score. Each rule gives 0..1; the reward is the weighted sum of its parts
(stage.alignment.reward_weights, whose every key validation checks against RULES and SCORES):
the rules alone (reward=rule), the reward model's or the server's score alone (reward=model,
remote), or the rules and those scores together (reward=combined; see `weights`).

- exact_match: 1 when the reply's answer (the last match of answer_pattern) equals the record's
  answer (small arithmetic questions and the like);
- format: 1 when the whole reply (trimmed) matches format_pattern;
- digits: the share of the reply's non-space characters that are digits, a dense partial credit
  for numeric answers;
- math: 1 when the reply's final answer (in \\boxed{...}, after ####, else its last number)
  equals the record's answer as a number or as a simplified expression (llmtrain.rlhf.verify);
- code: 1 when the reply's code passes the record's answer (Python tests, e.g. asserts), run in
  a sandboxed subprocess (llmtrain.rlhf.sandbox), never in the training process.
"""

from __future__ import annotations

import re
from typing import Callable, Optional

from llmtrain.rlhf import sandbox, verify

# (reply, the record's answer, the alignment settings) -> score in 0..1.
RULES: dict[str, Callable] = {}
# The scores beside the rules, as reward_weights names them, and the setting each comes from:
# a frozen reward model (a stage=rm checkpoint) and a reward server.
SCORES = {"model": "reward_load", "remote": "reward_url"}
SOURCES = ("rule", "model", "remote", "combined")  # stage.alignment.reward


def rule(name: str):
    def add(fn):
        RULES[name] = fn
        return fn
    return add


def last_answer(reply: str, answer_pattern: str) -> Optional[str]:
    found = re.findall(answer_pattern, reply)
    return found[-1].strip() if found else None


@rule("exact_match")
def exact_match(reply, answer, a) -> float:
    return float(answer is not None
                 and last_answer(reply, a.answer_pattern) == str(answer).strip())


@rule("format")
def format_match(reply, answer, a) -> float:
    return float(re.fullmatch(a.format_pattern, reply.strip()) is not None)


@rule("digits")
def digits(reply, answer, a) -> float:
    visible = [c for c in reply if not c.isspace()]
    return sum(c.isdigit() for c in visible) / len(visible) if visible else 0.0


@rule("math")
def math_answer(reply, answer, a) -> float:
    return float(answer is not None and verify.same_answer(verify.final_answer(reply), answer))


@rule("code")
def code_tests(reply, answer, a) -> float:
    if answer is None:
        return 0.0
    return float(sandbox.passes(sandbox.code_of(reply), str(answer), a.code_timeout,
                                a.code_memory_mb))


def weights(settings) -> dict[str, float]:
    """The parts of the reward and their weights, those of weight 0 left out: reward=rule the
    rules of reward_weights; model or remote that score alone (weight 1); combined the rules and
    the scores (model, remote) of reward_weights."""
    if settings.reward in SCORES:
        return {settings.reward: 1.0}
    return {name: weight for name, weight in settings.reward_weights.items()
            if weight and (name in RULES or settings.reward == "combined" and name in SCORES)}


def rule_scores(reply: str, answer: Optional[str], settings) -> dict[str, float]:
    """The score of each rule settings.reward_weights names, of one reply."""
    return {name: RULES[name](reply, answer, settings) for name in settings.reward_weights
            if name in RULES}


def reward(reply: str, answer: Optional[str], settings) -> float:
    """The weighted sum of the rules' scores (a rule of weight 0 does not run)."""
    return sum(weight * RULES[name](reply, answer, settings)
               for name, weight in weights(settings).items() if name in RULES)


def weighted_sum(parts: dict, settings):
    """The reward from its parts' scores (numbers, or tensors of one score per rollout)."""
    return sum(weight * parts[name] for name, weight in weights(settings).items())


def overlong_penalty(length: int, max_new_tokens: int, buffer: int, factor: float) -> float:
    """DAPO's soft overlong punishment: 0 up to max_new_tokens - buffer tokens, then falling
    linearly to -factor at max_new_tokens (buffer 0: none)."""
    if buffer <= 0 or length <= max_new_tokens - buffer:
        return 0.0
    return -factor * min(length - (max_new_tokens - buffer), buffer) / buffer
