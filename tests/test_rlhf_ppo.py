"""stage=ppo: actor, critic, reference and rule-based reward raise the mean reward on the toy
arithmetic task (see test_rlhf_grpo.py) within a bounded number of steps; the four roles run
colocated on two processes (tensor or pipeline parallelism 2, or two data-parallel replicas) on
CPU (gloo), and the critic checkpoints and resumes with the actor."""

from __future__ import annotations

import math
import shutil

from conftest import run_llmtrain, summary
from rlhf_helpers import ROLLOUTS, TINY, arithmetic_prompts, assert_reward_rises


def test_ppo_raises_the_mean_reward(tmp_path):
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "ppo"
    # No KL penalty here: on this toy task it would outweigh the small rewards of a random
    # policy for longer than a test may run.
    run_llmtrain("stage=ppo", "data=prompts", f"data.data_path=[{data}]", *TINY, *ROLLOUTS,
                 "optim.lr=5e-3", "optim.min_lr=5e-3", "stage.alignment.critic_lr=1e-3",
                 "stage.alignment.kl_coef=0.0", "stage.micro_batch_size=16",
                 "stage.global_batch_size=32", "stage.train_iters=14", f"hydra.run.dir={run}",
                 "checkpoint.save=null")
    metrics = summary(run)["metrics"]
    reward = metrics["reward"]
    assert_reward_rises(reward)
    assert metrics["entropy"][-1] < metrics["entropy"][0]
    assert all(math.isfinite(v) for v in metrics["value_loss"])


def test_ppo_roles_run_on_two_pipeline_stages_and_resume(tmp_path):
    """PP=2 (TP=2 and DP=2, with the critic on its own layout and on the run's, are in
    test_rlhf_placement.py)."""
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "ppo"
    args = ["stage=ppo", "parallel=tp1pp2", "data=prompts", f"data.data_path=[{data}]", *TINY,
            *ROLLOUTS, "stage.micro_batch_size=4", "stage.global_batch_size=8",
            f"hydra.run.dir={run}", "checkpoint.save_interval=2"]
    out = run_llmtrain(*args, "stage.train_iters=2").stdout
    assert "on 2 cpu process(es)" in out
    assert (run / "checkpoints" / "iter_0000002").is_dir()
    assert (run / "checkpoints" / "critic" / "iter_0000002").is_dir()
    first = summary(run)["metrics"]
    assert all(math.isfinite(v) for name in ("reward", "kl", "entropy", "value_loss")
               for v in first[name])
    assert 0.0 < first["entropy"][0] <= math.log(4096) + 1e-3  # over the whole vocabulary

    out = run_llmtrain(*args, "stage.train_iters=3").stdout
    assert "resuming after step 2" in out
    assert "critic: loaded" in out and "critic" in out.split("critic: loaded")[1].split("\n")[0]
    assert summary(run)["start_step"] == 2


def test_ppo_resumes_the_critic_of_the_actors_step(tmp_path):
    """A crash between the critic's commit and the actor's (saved in that order) leaves the
    critic one step ahead: the resumed run takes the critic of the actor's step."""
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "ppo"
    args = ["stage=ppo", "data=prompts", f"data.data_path=[{data}]", *TINY, *ROLLOUTS,
            "stage.micro_batch_size=4", "stage.global_batch_size=8", f"hydra.run.dir={run}",
            "checkpoint.save_interval=1"]
    run_llmtrain(*args, "stage.train_iters=3")
    actor = run / "checkpoints"
    shutil.rmtree(actor / "iter_0000003")  # the actor's step 3 never committed
    (actor / "latest_checkpointed_iteration.txt").write_text("2")
    assert (actor / "critic" / "iter_0000003").is_dir()

    out = run_llmtrain(*args, "stage.train_iters=4").stdout
    assert "resuming after step 2" in out
    assert f"critic: loaded {actor / 'critic' / 'iter_0000002'}" in out
    assert "warning: the critic resumes" not in out


def test_ppo_commits_the_critic_before_the_actor_with_async_saves(tmp_path):
    """Background saves commit at step boundaries: the critic's step first, so a crash between
    the two commits leaves the critic ahead of the actor (which resuming handles, above),
    never behind."""
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "ppo"
    out = run_llmtrain("stage=ppo", "data=prompts", f"data.data_path=[{data}]", *TINY, *ROLLOUTS,
                       "stage.micro_batch_size=4", "stage.global_batch_size=8",
                       f"hydra.run.dir={run}", "checkpoint.save_interval=2",
                       "checkpoint.async_save=true", "stage.train_iters=5").stdout
    lines = out.splitlines()

    def commit(folder):
        return next(k for k, line in enumerate(lines) if f"saved {folder} in" in line)

    actor = run / "checkpoints"
    for step in (2, 4, 5):
        assert commit(actor / "critic" / f"iter_{step:07d}") < commit(actor / f"iter_{step:07d}")
