"""stage=grpo: groups of sampled replies per prompt, scored by rule, raise the mean reward of a
tiny policy within a bounded number of steps, and the reward, KL and entropy reach TensorBoard.

The toy task: arithmetic prompts scored by exact_match (the right sum) plus digits (the share of
digits in the reply, a dense credit for numeric answers); a random 5M-parameter model answers in
random tokens, so it is the digits credit that it learns to collect in a few steps."""

from __future__ import annotations

import math

from conftest import run_llmtrain, summary
from rlhf_helpers import (ROLLOUTS, TINY, arithmetic_prompts, assert_reward_rises,
                          separable_pairs)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_grpo_raises_the_mean_reward(tmp_path):
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "grpo"
    run_llmtrain("stage=grpo", "data=prompts", f"data.data_path=[{data}]", *TINY, *ROLLOUTS,
                 "optim.lr=5e-3", "optim.min_lr=5e-3", "stage.alignment.group_size=8",
                 "stage.micro_batch_size=16", "stage.global_batch_size=32",
                 "stage.train_iters=10", f"hydra.run.dir={run}", "checkpoint.save=null")
    metrics = summary(run)["metrics"]
    reward = metrics["reward"]
    assert_reward_rises(reward)
    assert metrics["entropy"][-1] < metrics["entropy"][0]  # the policy sharpens
    assert metrics["kl"][0] == 0.0 < metrics["kl"][-1]  # and leaves its reference
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"train/reward", "train/kl", "train/entropy"} <= set(events.Tags()["scalars"])


def test_grpo_scores_with_a_reward_model_from_stage_rm(tmp_path):
    pairs = separable_pairs(tmp_path / "pairs.jsonl", count=32)
    prompts = arithmetic_prompts(tmp_path / "prompts.jsonl")
    rm = tmp_path / "rm"
    run_llmtrain("stage=rm", "data=preference", f"data.data_path=[{pairs}]", *TINY,
                 "stage.micro_batch_size=4", "stage.global_batch_size=8", "stage.train_iters=3",
                 f"hydra.run.dir={rm}")
    run = tmp_path / "grpo"
    out = run_llmtrain("stage=grpo", "data=prompts", f"data.data_path=[{prompts}]", *TINY,
                       "stage.alignment.reward=model",
                       f"stage.alignment.reward_load={rm / 'checkpoints'}",
                       "stage.alignment.max_new_tokens=4", "stage.alignment.group_size=4",
                       "stage.micro_batch_size=8", "stage.global_batch_size=8",
                       "stage.train_iters=1", f"hydra.run.dir={run}", "checkpoint.save=null").stdout
    assert f"loaded {rm / 'checkpoints' / 'iter_0000003'} (frozen scorer)" in out
    reward = summary(run)["metrics"]["reward"][0]
    assert math.isfinite(reward) and reward != 0.0  # the head's score of each reply


def test_grpo_with_two_data_parallel_replicas(tmp_path):
    """Each replica samples and scores its own half of the step's prompts; the gradients meet."""
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "grpo_dp2"
    out = run_llmtrain("stage=grpo", "data=prompts", f"data.data_path=[{data}]", *TINY, *ROLLOUTS,
                       "parallel=tp1pp1", "launcher.nproc_per_node=2", "optim.lr=5e-3",
                       "optim.min_lr=5e-3", "stage.alignment.group_size=8",
                       "stage.micro_batch_size=8", "stage.global_batch_size=32",
                       "stage.train_iters=10", f"hydra.run.dir={run}",
                       "checkpoint.save=null").stdout
    assert "DP 2" in out
    reward = summary(run)["metrics"]["reward"]
    assert_reward_rises(reward)
