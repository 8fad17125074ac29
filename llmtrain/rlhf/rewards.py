"""Rule-based rewards of generated replies: the score GRPO and PPO maximise without a reward
model. Each rule gives 0..1; the reward is their weighted sum (stage.alignment.reward_weights).

- exact_match: 1 when the reply's answer (the last match of answer_pattern) equals the record's
  answer (small arithmetic questions and the like);
- format: 1 when the whole reply (trimmed) matches format_pattern;
- digits: the share of the reply's non-space characters that are digits, a dense partial credit
  for numeric answers.
"""

from __future__ import annotations

import re
from typing import Optional

RULES = ("exact_match", "format", "digits")


def last_answer(reply: str, answer_pattern: str) -> Optional[str]:
    found = re.findall(answer_pattern, reply)
    return found[-1].strip() if found else None


def rule_scores(reply: str, answer: Optional[str], answer_pattern: str,
                format_pattern: str) -> dict[str, float]:
    """Every rule's score of one reply."""
    visible = [c for c in reply if not c.isspace()]
    return {
        "exact_match": float(answer is not None
                             and last_answer(reply, answer_pattern) == str(answer).strip()),
        "format": float(re.fullmatch(format_pattern, reply.strip()) is not None),
        "digits": sum(c.isdigit() for c in visible) / len(visible) if visible else 0.0,
    }


def reward(reply: str, answer: Optional[str], weights: dict[str, float], answer_pattern: str,
           format_pattern: str) -> float:
    scores = rule_scores(reply, answer, answer_pattern, format_pattern)
    return sum(weight * scores[name] for name, weight in weights.items())
