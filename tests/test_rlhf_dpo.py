"""stage=dpo: the policy learns to prefer the chosen replies over the rejected ones (the margin
of implicit rewards rises) while staying close to its frozen reference (small KL): DPO's loss
with reference log-probabilities computed each step, and IPO's with length-normalised
log-probabilities computed once, which settles at its target margin 1/2 (with beta 1)."""

from __future__ import annotations

import pytest

from conftest import run_llmtrain, summary
from rlhf_helpers import TINY, separable_pairs


def dpo(tmp_path, lr: float, *overrides: str):
    data = separable_pairs(tmp_path / "pairs.jsonl", count=64)
    run = tmp_path / "dpo"
    out = run_llmtrain("stage=dpo", "data=preference", f"data.data_path=[{data}]", *TINY,
                       f"optim.lr={lr}", f"optim.min_lr={lr}", "stage.micro_batch_size=4",
                       "stage.global_batch_size=8", "stage.train_iters=10",
                       f"hydra.run.dir={run}", "checkpoint.save=null", *overrides).stdout
    return out, summary(run)


def test_dpo_raises_the_margin_with_a_small_kl(tmp_path):
    _, result = dpo(tmp_path, 2e-5, "stage.alignment.loss_type=sigmoid",
                    "stage.alignment.reference_logprobs=on_the_fly")
    margin, kl = result["metrics"]["margin"], result["metrics"]["kl"]
    assert margin[0] == pytest.approx(0.0, abs=1e-6)  # the policy starts as its reference
    assert all(b > a for a, b in zip(margin, margin[1:])) and margin[-1] > 1.0, margin
    assert min(result["metrics"]["accuracy"][1:]) == 1.0
    assert max(kl) < 1.0, kl  # nats per reply token
    assert result["losses"][-1] < result["losses"][0]


def test_ipo_settles_at_its_target_margin_near_the_reference(tmp_path):
    out, result = dpo(tmp_path, 1e-4, "stage.alignment.loss_type=ipo", "stage.alignment.beta=1.0",
                      "stage.alignment.length_normalized=true",
                      "stage.alignment.reference_logprobs=precomputed")
    assert "reference log-probabilities of 63 pairs computed" in out
    margin, kl = result["metrics"]["margin"], result["metrics"]["kl"]
    assert all(0.3 < m < 0.8 for m in margin[-3:]), margin  # IPO's optimum: 1 / (2 beta)
    assert max(kl[-3:]) < 0.2, kl
    assert result["losses"][-1] < 0.05 < result["losses"][0]


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_learn_the_preference_without_a_reference(tmp_path, loss_type):
    out, result = dpo(tmp_path, 1e-4, f"stage.alignment.loss_type={loss_type}",
                      "stage.alignment.beta=2.0")
    assert f"loss_type={loss_type} is reference-free: no reference model loaded" in out
    assert "kl" not in result["metrics"]
    margin = result["metrics"]["margin"]
    assert margin[-1] > margin[0] + 0.5, margin
    assert result["losses"][-1] < result["losses"][0]


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_preference_stages_under_pipeline_parallelism_match_one_process(tmp_path, stage):
    """PP=2 follows the one-process run step for step: each stage hands the next its hidden
    states untouched (DPO once negated them, turning the model's loss into log-probabilities
    before the last stage) and only the last stage has the reward model's head (RM crashed)."""
    data = separable_pairs(tmp_path / "pairs.jsonl", count=32)
    results = []
    for layout in ("tp1pp1", "tp1pp2"):
        run = tmp_path / layout
        out = run_llmtrain(f"stage={stage}", f"parallel={layout}", "data=preference",
                           f"data.data_path=[{data}]", *TINY, "optim.lr=1e-4",
                           "optim.min_lr=1e-4", "stage.micro_batch_size=2",
                           "stage.global_batch_size=8", "stage.train_iters=3",
                           f"hydra.run.dir={run}", "checkpoint.save=null", timeout=300).stdout
        results.append(summary(run))
    assert "on 2 cpu process(es)" in out
    one, pp2 = results
    assert one["losses"][0] == pytest.approx(0.6931, abs=1e-4)  # log 2: nothing preferred yet
    assert pp2["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert pp2["metrics"]["margin"] == pytest.approx(one["metrics"]["margin"], rel=1e-5, abs=1e-7)
    assert one["metrics"]["margin"][-1] > one["metrics"]["margin"][0] == 0.0
