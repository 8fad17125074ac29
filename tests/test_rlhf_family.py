"""The policy-gradient and preference families by name (stage.alignment.advantage_estimator,
policy_loss, loss_agg_mode, kl_estimator, loss_type), each on a hand-computed batch, and the
verifiable rewards (math verifier, sandboxed code tests) through the rule table."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import run_llmtrain, summary
from rlhf_helpers import ROLLOUTS, TINY, arithmetic_prompts, assert_reward_rises, reward_server

from llmtrain.config.schema import AlignmentConfig
from llmtrain.rlhf import advantages, losses, sandbox, verify
from llmtrain.rlhf.rewards import overlong_penalty, reward


def test_dapo_clips_low_and_high_apart():
    """ratio 1.5 with advantage +1 stops at 1 + clip_ratio_high; ratio 0.5 with advantage -1 at
    1 - clip_ratio_low; inside the range nothing is clipped."""
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old, adv, mask = torch.zeros(1, 3), torch.tensor([[1.0, -1.0, 1.0]]), torch.ones(1, 3)
    loss, clipped, ratio = losses.POLICY_LOSSES["vanilla"](logp, old, adv, mask, 0.2, 0.28)
    assert torch.allclose(loss, torch.tensor([[-1.28, 0.8, -1.1]]))
    assert clipped.tolist() == [[1.0, 1.0, 0.0]]
    assert torch.allclose(ratio, torch.tensor([[1.5, 0.5, 1.1]]))


def test_gspo_takes_one_ratio_per_sequence():
    """Token log-ratios 0.2 and 0 (and a padded one) give the sequence ratio exp(0.1) on every
    token; a token mean per sequence gives each token exp(0.1) x advantage / length of
    gradient; a sequence outside the range is clipped whole."""
    logp = torch.tensor([[0.2, 0.0, 5.0]], requires_grad=True)
    old, mask = torch.zeros(1, 3), torch.tensor([[1.0, 1.0, 0.0]])
    adv = torch.ones(1, 3)
    loss, clipped, ratio = losses.POLICY_LOSSES["gspo"](logp, old, adv, mask, 0.2, 0.2)
    assert torch.allclose(ratio[0, :2], torch.full((2,), math.exp(0.1)))
    total, count = losses.LOSS_AGGREGATIONS["seq-mean-token-mean"](loss, mask, 8)
    (total / count).backward()
    assert torch.allclose(logp.grad, torch.tensor([[-math.exp(0.1) / 2] * 2 + [0.0]]))
    far = torch.tensor([[0.5, 0.5, 0.0]])
    _, clipped, _ = losses.POLICY_LOSSES["gspo"](far, old, adv, mask, 0.2, 0.2)
    assert clipped[0, :2].tolist() == [1.0, 1.0]


def test_loss_aggregations():
    """Rows of 1 and 3 tokens of losses 4 and 1, 1, 1: token-mean weighs tokens (7 / 4),
    seq-mean-token-mean sequences ((4 + 1) / 2), seq-mean-token-sum-norm divides the token sum
    by the longest reply allowed (4), then by the sequences (2)."""
    loss = torch.tensor([[4.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    means = {name: float(total / count) for name, (total, count) in
             ((n, agg(loss, mask, 4)) for n, agg in losses.LOSS_AGGREGATIONS.items())}
    assert means == pytest.approx({"token-mean": 7 / 4, "seq-mean-token-mean": 5 / 2,
                                   "seq-mean-token-sum-norm": 7 / 4 / 2})


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert losses.kl_estimate(logp, ref, "k1").item() == pytest.approx(1.0)
    assert losses.kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5)
    assert losses.kl_estimate(logp, ref, "k3").item() == pytest.approx(math.exp(-1.0))
    assert all(losses.kl_estimate(logp, logp, k).item() == 0.0 for k in ("k1", "k2", "k3"))


def token_rewards(scores, length=3):
    """Scores at the last of `length` reply tokens."""
    rewards = torch.zeros(len(scores), length)
    rewards[:, -1] = torch.tensor(scores)
    return rewards, torch.ones(len(scores), length)


def test_advantage_estimators():
    settings = AlignmentConfig(group_size=4, gamma=1.0)
    rewards, mask = token_rewards([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    grpo = advantages.ESTIMATORS["grpo"].fn(rewards, mask, None, settings)[0][:, 0]
    assert torch.allclose(grpo[:4], torch.tensor([1.0, -1.0, 1.0, -1.0]), atol=1e-4)
    dr_grpo = advantages.ESTIMATORS["grpo"].fn(
        rewards, mask, None, AlignmentConfig(group_size=4, norm_adv_by_std=False))[0][:, 0]
    assert torch.allclose(dr_grpo, torch.tensor([0.5, -0.5, 0.5, -0.5, 0.75, -0.25, -0.25,
                                                 -0.25]))
    rloo = advantages.ESTIMATORS["rloo"].fn(rewards, mask, None, settings)[0][:, 0]
    assert torch.allclose(rloo[4:], torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    rpp, returns = advantages.ESTIMATORS["reinforce_plus_plus"].fn(rewards, mask, None,
                                                                   settings)
    assert returns is None
    assert rpp.mean().item() == pytest.approx(0.0, abs=1e-6)  # whitened over the batch
    assert rpp.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(rpp[0], rpp[2]) and (rpp[0] > 0).all() and (rpp[1] < 0).all()


def test_reinforce_plus_plus_discounts_rewards_to_each_token():
    rewards = torch.tensor([[0.0, 0.5, 0.0, 1.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    returns = advantages.discounted_returns(rewards, mask, 0.5)
    assert torch.allclose(returns, torch.tensor([[0.0, 0.75, 0.5, 1.0, 0.0]]))


def test_overlong_shaping():
    assert [overlong_penalty(n, 16, 4, 1.0) for n in (10, 12, 14, 16)] == [0.0, 0.0, -0.5, -1.0]
    assert overlong_penalty(16, 16, 0, 1.0) == 0.0


def test_reference_free_preference_losses():
    chosen, rejected = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    simpo = losses.preference(chosen, rejected, None, None,
                              AlignmentConfig(loss_type="simpo", beta=2.0, simpo_gamma=0.5))
    assert simpo.item() == pytest.approx(F.softplus(torch.tensor(
        -(2.0 * math.log(2) - 0.5))).item())
    # ORPO: the chosen reply's NLL plus beta x -log sigmoid(log odds(0.5) - log odds(0.25)).
    orpo = losses.preference(chosen, rejected, None, None,
                             AlignmentConfig(loss_type="orpo", beta=0.1))
    assert orpo.item() == pytest.approx(math.log(2) + 0.1 * math.log(1 + 1 / 3))
    assert not losses.PREFERENCE_LOSSES["simpo"].uses_reference
    assert not losses.PREFERENCE_LOSSES["orpo"].uses_reference


@pytest.mark.parametrize("reply, expected, right", [
    ("so the total is \\boxed{\\frac{1}{2}}.", "0.5", True),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", True),
    ("#### 1,234", "1234", True),
    ("x = \\boxed{2(x+1)}", "2x + 2", True),
    ("\\boxed{\\sqrt{4}}", "2", True),
    ("I think 3 then 5", "5", True),  # no box, no ####: the last number
    ("\\boxed{3}", "4", False),
    ("no answer here", "4", False),
])
def test_math_verifier(reply, expected, right):
    assert verify.same_answer(verify.final_answer(reply), expected) is right


def test_math_rule_through_the_reward_table():
    settings = AlignmentConfig(reward_weights={"math": 1.0, "format": 0.0})
    assert reward("The answer is \\boxed{7}", "7", settings) == 1.0
    assert reward("The answer is \\boxed{8}", "7", settings) == 0.0


def test_code_reward_runs_the_reply_in_a_sandbox():
    settings = AlignmentConfig(reward_weights={"code": 1.0}, code_timeout=2.0)
    tests = "assert add(2, 3) == 5"
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert reward(good, tests, settings) == 1.0
    assert reward("```python\ndef add(a, b):\n    return a - b\n```", tests, settings) == 0.0
    began = time.monotonic()
    assert reward("```python\nwhile True:\n    pass\n```", tests, settings) == 0.0
    assert time.monotonic() - began < 5.0  # killed at code_timeout
    blocked = sandbox.run("import socket\nsocket.create_connection(('127.0.0.1', 9))", "",
                          2.0, 256)
    assert blocked.returncode != 0 and b"network access is disabled" in blocked.stderr
    greedy = sandbox.run("x = bytearray(2 * 1024 ** 3)", "", 2.0, 256)
    assert greedy.returncode != 0 and b"MemoryError" in greedy.stderr
    # The training process is untouched by what the reply does.
    assert reward("```python\nimport os\nos.environ['LEAK'] = '1'\ndef add(a, b):\n"
                  "    return a + b\n```", tests, settings) == 1.0
    import os
    assert "LEAK" not in os.environ


# Short runs of the toy arithmetic task (tests/rlhf_helpers.py), as test_rlhf_grpo's.

def grpo_run(tmp_path, *overrides: str, steps: int = 10):
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "run"
    out = run_llmtrain("stage=grpo", "data=prompts", f"data.data_path=[{data}]", *TINY,
                       *ROLLOUTS, "optim.lr=5e-3", "optim.min_lr=5e-3",
                       "stage.alignment.group_size=8", "stage.micro_batch_size=16",
                       "stage.global_batch_size=32", f"stage.train_iters={steps}",
                       f"hydra.run.dir={run}", "checkpoint.save=null", *overrides).stdout
    return out, summary(run)["metrics"]


def test_dapo_drops_groups_of_equal_rewards_refills_the_batch_and_learns(tmp_path):
    """DAPO: decoupled clip range, token-level loss and dynamic sampling. The reward server gives the digits credit to prompts of an even sum and 0 to the others, whose
    groups (all equal) are dropped: each step asks for more groups than it trains on, and
    still learns."""
    def score(request):
        rules = AlignmentConfig(reward_weights={"digits": 1.0})
        return {"rewards": [reward(reply, None, rules) if int(answer) % 2 == 0 else 0.0
                            for reply, answer in zip(request["replies"], request["answers"])]}

    with reward_server(score) as (url, requests):
        _, metrics = grpo_run(tmp_path, "stage.alignment.reward=remote",
                              f"stage.alignment.reward_url={url}",
                              "stage.alignment.filter_groups=true",
                              "stage.alignment.max_sampling_rounds=3",
                              "stage.alignment.clip_ratio_low=0.2",
                              "stage.alignment.clip_ratio_high=0.28",
                              "stage.alignment.loss_agg_mode=token-mean")
    assert len(requests) > 10  # refills: more than one generation round in some steps
    assert 0.0 < max(metrics["groups_filtered"]) < 1.0, metrics["groups_filtered"]
    assert_reward_rises(metrics["reward"])
    assert all(0.0 <= c <= 1.0 for c in metrics["reply_clipped"])
    assert max(metrics["reply_length_max"]) <= 8


def test_reinforce_plus_plus_raises_the_mean_reward(tmp_path):
    """REINFORCE++: returns whitened over the batch (no group baseline). (RLOO's and Dr.
    GRPO's unnormalised advantages are as small as the toy's rewards, ~0.01: at this learning
    rate they do not learn it in 10 steps.)"""
    _, metrics = grpo_run(tmp_path, "stage.alignment.advantage_estimator=reinforce_plus_plus")
    assert_reward_rises(metrics["reward"])
    assert metrics["kl"][0] == 0.0 < metrics["kl"][-1]


@pytest.mark.parametrize("overrides", [
    # GSPO: a ratio per sequence, a token mean per sequence, GSPO's tight clip range.
    ["stage.alignment.policy_loss=gspo", "stage.alignment.loss_agg_mode=seq-mean-token-mean",
     "stage.alignment.clip_ratio_low=0.0003", "stage.alignment.clip_ratio_high=0.0004",
     "stage.alignment.ppo_epochs=2"],
    # Dr. GRPO: no std, no length normalisation.
    ["stage.alignment.norm_adv_by_std=false",
     "stage.alignment.loss_agg_mode=seq-mean-token-sum-norm"],
    # RLOO with the KL as a reward penalty (k2).
    ["stage.alignment.advantage_estimator=rloo",
     "stage.alignment.use_kl_in_reward=true", "stage.alignment.kl_estimator=k2"],
    # DAPO's overlong shaping over the whole reply length: replies of 8 tokens lose 1.
    ["stage.alignment.overlong_buffer_len=8", "stage.alignment.overlong_penalty_factor=1.0"],
], ids=["gspo", "dr_grpo", "rloo_kl_in_reward", "overlong"])
def test_each_policy_gradient_variant_runs_and_reports(tmp_path, overrides):
    _, metrics = grpo_run(tmp_path, *overrides, steps=3)
    for name in ("reward", "reward_std", "kl", "entropy", "clipfrac", "ratio", "reply_length",
                 "reply_length_max", "reply_clipped", "groups_filtered", "seconds_step"):
        assert len(metrics[name]) == 3 and all(math.isfinite(v) for v in metrics[name]), name
    assert metrics["kl"][-1] > 0.0  # the policy moved
    if "stage.alignment.overlong_buffer_len=8" in overrides:  # digits give 0..1, length -1..0
        assert metrics["reward"][0] < 0.0 and metrics["reply_clipped"][0] > 0.0
    if "stage.alignment.ppo_epochs=2" in overrides:  # the metrics are the second pass's
        assert max(metrics["clipfrac"]) > 0.0  # GSPO's tight range clips whole sequences
    else:
        assert metrics["ratio"] == pytest.approx([1.0] * 3, abs=1e-4)  # one on-policy pass


def test_the_math_verifier_scores_rollouts(tmp_path):
    """reward_weights.math: the verifier's 0/1 beside the digits credit (a random policy
    writes no right sums: the math part stays 0, the run still scores and learns digits)."""
    out, metrics = grpo_run(tmp_path, "stage.alignment.reward_weights.exact_match=0",
                            "stage.alignment.reward_weights.math=1", steps=2)
    assert all(0.0 < r < 2.0 for r in metrics["reward"])
