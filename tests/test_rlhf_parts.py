"""The pure parts of the alignment stages: preference and prompt records through the chat
templates, rule-based rewards, advantages and losses."""

from __future__ import annotations

import json

import pytest
import torch

from llmtrain.config.schema import AlignmentConfig, TokenizerConfig
from llmtrain.data import chat
from llmtrain.data.sources import DataError
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.rlhf import advantages, losses
from llmtrain.rlhf.records import encode_pair, encode_prompts, read
from llmtrain.rlhf import rewards
from llmtrain.rlhf.rewards import reward, rule_scores

@pytest.fixture(scope="module")
def corpus_tokenizer():
    tokenizer = load_tokenizer(TokenizerConfig(tokenizer_type="corpus"))
    return tokenizer, chat.load_template("chatml", tokenizer)


def test_a_pair_trains_exactly_its_reply_after_the_shared_prompt(corpus_tokenizer):
    tokenizer, template = corpus_tokenizer
    record = {"prompt": [{"role": "user", "content": "Two plus two?"}],
              "chosen": "4", "rejected": [{"role": "assistant", "content": "five"}],
              "system": "Be brief."}
    chosen, rejected = encode_pair(record, "r1", template, tokenizer, None)
    first = chosen.mask.index(1)
    assert chosen.ids[:first] == rejected.ids[:first]  # the same prompt, system turn included
    assert "Be brief." in tokenizer.decode(chosen.ids[:first], keep_special=True)
    trained = [tokenizer.decode([i for i, m in zip(e.ids, e.mask) if m], keep_special=True)
               for e in (chosen, rejected)]
    assert trained == ["4<|im_end|>", "five<|im_end|>"]


def test_prompts_open_the_assistant_turn_and_know_their_stop_tokens(corpus_tokenizer, tmp_path):
    tokenizer, template = corpus_tokenizer
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": 5}) + "\n")
    prompts, stops = encode_prompts([str(path)], template, tokenizer, None)
    text = tokenizer.decode(prompts[0].ids, keep_special=True)
    assert text.endswith("<|im_start|>assistant\n") and "What is 2 + 3?" in text
    assert prompts[0].answer == "5"
    assert set(stops) == {tokenizer.token_id("<|im_end|>"), tokenizer.eod}


def test_bad_records_are_named_with_their_line(corpus_tokenizer, tmp_path):
    tokenizer, template = corpus_tokenizer
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(DataError, match=r"pairs.jsonl.*line 2.*no key 'rejected'.*'prompt', "
                                        r"'chosen'"):
        for where, record in read([str(path)]):
            encode_pair(record, where, template, tokenizer, None)


def rules(**weights) -> AlignmentConfig:
    return AlignmentConfig(reward_weights=weights or {"exact_match": 1.0, "format": 0.0,
                                                      "digits": 0.0})


def test_rule_rewards():
    assert rule_scores("The answer is 12", "12", rules()) == {
        "exact_match": 1.0, "format": 0.0, "digits": 2 / 13}
    assert rule_scores(" 12 ", "12", rules())["format"] == 1.0
    assert rule_scores("12 or 13", "12", rules())["exact_match"] == 0.0  # the last one
    assert reward("7", "7", rules(exact_match=1.0, format=0.5, digits=0.0)) == 1.5
    assert reward("", None, rules(exact_match=1.0, digits=1.0)) == 0.0


def test_rules_beside_a_reward_model_and_a_server_are_one_weighted_sum():
    """reward=combined: the verifiers' and the other rules' scores, the reward model's and the
    server's, each weighed by reward_weights; reward=model alone ignores the rules."""
    a = AlignmentConfig(reward="combined", reward_weights={
        "exact_match": 0.0, "math": 1.0, "code": 0.5, "digits": 0.25, "model": 2.0,
        "remote": -1.0})
    replies = ["so \\boxed{\\frac{1}{2}}", "```python\ndef add(a, b):\n    return a + b\n```"]
    answers = ["0.5", "assert add(2, 3) == 5"]
    assert rewards.weights(a) == {"math": 1.0, "code": 0.5, "digits": 0.25, "model": 2.0,
                                  "remote": -1.0}
    rules = [rule_scores(r, x, a) for r, x in zip(replies, answers)]
    assert [(s["math"], s["code"]) for s in rules] == [(1.0, 0.0), (0.0, 1.0)]
    parts = {name: torch.tensor([s[name] for s in rules]) for name in ("math", "code", "digits")}
    parts.update(model=torch.tensor([0.3, -0.2]), remote=torch.tensor([0.1, 0.4]))
    total = rewards.weighted_sum(parts, a)
    digits = [s["digits"] for s in rules]
    assert total.tolist() == pytest.approx([1.0 + 0.25 * digits[0] + 0.6 - 0.1,
                                            0.5 + 0.25 * digits[1] - 0.4 - 0.4])
    assert rewards.weights(AlignmentConfig(reward="model", reward_weights=a.reward_weights)) == {
        "model": 1.0}


def test_group_advantages_compare_replies_of_one_prompt_only():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    adv = advantages.group_normalized(rewards, group_size=4)
    assert torch.allclose(adv[:4], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-4)
    assert torch.equal(adv[4:], torch.zeros(4))  # all equal: nothing to learn


def test_gae_matches_the_recursion_and_ignores_the_prompt():
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.4, 0.2, 9.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    adv, returns = advantages.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d3 = 1.0 - 0.2
    d2 = 0.9 * 0.2 - 0.4
    d1 = 0.9 * 0.4 - 0.5
    a3, a2 = d3, d2 + 0.72 * d3
    a1 = d1 + 0.72 * a2
    assert torch.allclose(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]))
    assert torch.allclose(returns, (adv + values) * mask)


def test_losses():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    assert torch.allclose(losses.bradley_terry(chosen, rejected),
                          torch.nn.functional.softplus(torch.tensor([-2.0, 2.0])))
    zero = torch.zeros(2)
    assert torch.allclose(losses.preference(zero, zero, zero, zero,
                                            AlignmentConfig(beta=0.1, loss_type="sigmoid")),
                          torch.full((2,), 0.6931), atol=1e-4)
    assert torch.allclose(losses.preference(zero, zero, zero, zero,
                                            AlignmentConfig(beta=0.5, loss_type="ipo")),
                          torch.ones(2))
    assert losses.kl_estimate(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0
    assert losses.kl_estimate(torch.tensor([-1.0]), torch.tensor([-2.0])).item() > 0.0
    surrogate, clipped, _ = losses.token_ratio(torch.log(torch.tensor([1.5])), zero[:1],
                                               torch.ones(1), None, 0.2, 0.2)
    assert torch.allclose(surrogate, torch.tensor([-1.2])) and clipped.item() == 1.0
