"""stage=grpo: groups of sampled replies per prompt, scored by rule, raise the mean reward of a
tiny policy within a bounded number of steps, and the reward, KL and entropy reach TensorBoard.

The toy task: arithmetic prompts scored by exact_match (the right sum) plus digits (the share of
digits in the reply, a dense credit for numeric answers); a random 5M-parameter model answers in
random tokens, so it is the digits credit that it learns to collect in a few steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import run_llmtrain, summary
from inference_helpers import ServerProcess
from rlhf_helpers import (ROLLOUTS, TINY, arithmetic_prompts, assert_reward_rises, mean,
                          reward_server, separable_pairs)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llmtrain.config.schema import AlignmentConfig
from llmtrain.rlhf.remote import RoleServerError, remote_rewards
from llmtrain.rlhf.rewards import reward, rule_scores


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


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> Path:
    """A stage=rm checkpoint that ranks polite replies above curt ones (20 steps)."""
    folder = tmp_path_factory.mktemp("rm")
    pairs = separable_pairs(folder / "pairs.jsonl")
    run_llmtrain("stage=rm", "data=preference", f"data.data_path=[{pairs}]", *TINY,
                 "stage.micro_batch_size=4", "stage.global_batch_size=8", "stage.train_iters=20",
                 f"hydra.run.dir={folder / 'run'}")
    return folder / "run" / "checkpoints"


def grpo_scored_by(reward_args: list[str], prompts: Path, run: Path) -> str:
    """Two GRPO steps on the arithmetic prompts, scored as `reward_args` say; stdout."""
    return run_llmtrain("stage=grpo", "data=prompts", f"data.data_path=[{prompts}]", *TINY,
                        *reward_args, "stage.alignment.max_new_tokens=4",
                        "stage.alignment.group_size=4", "stage.micro_batch_size=8",
                        "stage.global_batch_size=8", "stage.train_iters=2", f"hydra.run.dir={run}",
                        "checkpoint.save=null").stdout


def test_grpo_scores_with_a_reward_model_alone_and_beside_rules_and_a_server(tmp_path,
                                                                            reward_model):
    """reward=model: the head's score of each reply. reward=combined: the verifier rules (math,
    code), the digits credit, the reward model and a reward server in one weighted sum, each
    part's mean reported beside it. The first step's replies are those of the run scored by the
    model alone (the same seed), so its model part is that run's reward."""
    prompts = arithmetic_prompts(tmp_path / "prompts.jsonl")
    out = grpo_scored_by(["stage.alignment.reward=model",
                          f"stage.alignment.reward_load={reward_model}"], prompts,
                         tmp_path / "model")
    assert f"loaded {reward_model / 'iter_0000020'} (frozen scorer)" in out
    alone = summary(tmp_path / "model")["metrics"]["reward"]
    assert math.isfinite(alone[0]) and alone[0] != 0.0
    assert "reward_model" not in summary(tmp_path / "model")["metrics"]  # a single part

    weights = {"exact_match": 0.0, "math": 1.0, "code": 0.25, "digits": 0.5, "model": 0.5,
               "remote": 2.0}
    rules = AlignmentConfig(reward_weights={"math": 1.0, "code": 1.0, "digits": 1.0})

    def served(reply):
        return len(reply) / 10

    with reward_server(lambda r: {"rewards": [served(x) for x in r["replies"]]}) as (url, asked):
        grpo_scored_by(["stage.alignment.reward=combined",
                        f"stage.alignment.reward_load={reward_model}",
                        f"stage.alignment.reward_url={url}",
                        *[f"stage.alignment.reward_weights.{k}={w}" for k, w in weights.items()]],
                       prompts, tmp_path / "combined")
    m = summary(tmp_path / "combined")["metrics"]
    assert m["reward_model"][0] == pytest.approx(alone[0], rel=1e-5)
    assert len(asked) == 2
    for step, request in enumerate(asked):
        replies = list(zip(request["replies"], request["answers"]))
        parts = {name: mean([rule_scores(reply, answer, rules)[name] for reply, answer in replies])
                 for name in ("math", "code", "digits")}
        parts["remote"] = mean([served(reply) for reply, _ in replies])
        parts["model"] = m["reward_model"][step]
        for name in ("math", "code", "digits", "remote"):
            assert m[f"reward_{name}"][step] == pytest.approx(parts[name], abs=1e-6), name
        assert m["reward"][step] == pytest.approx(
            sum(weights[name] * parts[name] for name in parts), rel=1e-5)
    assert m["reward_digits"][0] > 0.0 and m["reward_remote"][0] > 0.0


def test_a_reward_model_served_by_llmtrain_serve_scores_grpo_like_a_local_one(tmp_path,
                                                                               reward_model):
    """`python -m llmtrain.serve` of a stage=rm checkpoint (here with TP=2) answers
    reward=remote's requests at /v1/rewards: GRPO gets the rewards the reward model would give
    on the training ranks, and anyone can score text with it."""
    prompts = arithmetic_prompts(tmp_path / "prompts.jsonl")
    server = ServerProcess(f"load={reward_model}", "tensor_model_parallel_size=2",
                           "inference_max_batch_size=8")
    try:
        assert server.get("/v1/models")["data"][0]["kind"] == "reward model"
        prompt = "<|im_start|>user\nTell me about music, item 3.<|im_end|>\n<|im_start|>assistant\n"
        status, answer = server.send("/v1/rewards", {"prompts": [prompt, prompt],
                                                     "replies": ["Gladly, thank you.", "No."]})
        assert status == 200 and answer["rewards"][0] > answer["rewards"][1] + 1.0, answer
        status, answer = server.send("/v1/rewards", {"prompts": [prompt, prompt],
                                                     "replies": ["No."]})
        assert status == 400 and answer["error"]["message"] == (
            "2 prompts but 1 replies: give one reply per prompt")
        grpo_scored_by(["stage.alignment.reward=remote",
                        f"stage.alignment.reward_url={server.url}/v1/rewards"], prompts,
                       tmp_path / "served")
        assert server.get("/metrics?format=json")["sequences"] == 2 + 2 * 8
    finally:
        assert server.stop() == 0, server.output[-3000:]
    grpo_scored_by(["stage.alignment.reward=model", f"stage.alignment.reward_load={reward_model}"],
                   prompts, tmp_path / "local")
    served, local = summary(tmp_path / "served"), summary(tmp_path / "local")
    assert served["metrics"]["reward"] == pytest.approx(local["metrics"]["reward"], rel=1e-5)
    # The first step's loss is a sum of zero-mean advantages (ratios 1), about 1e-6 here: the
    # rewards' 1e-5 agreement bounds it to about 1e-5, not to its own size.
    assert served["losses"] == pytest.approx(local["losses"], rel=1e-4, abs=1e-5)


def test_generation_from_a_reward_model_is_refused_with_where_to_serve_it(reward_model):
    from llmtrain.generate.config import GenerateConfig
    from llmtrain.generate.plan import InferenceError, prepare

    with pytest.raises(InferenceError, match=(
            rf"step 20 of {reward_model} holds a reward model \(a scalar head, no output layer\)"
            rf": it scores text rather than generating it. Serve its scores with python -m "
            rf"llmtrain.serve load={reward_model} \(POST /v1/rewards\)")):
        prepare(GenerateConfig(load=str(reward_model)))


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


def test_grpo_takes_its_rewards_from_a_reward_server(tmp_path):
    """reward=remote: the reward role on a server of its own. Each step asks it once for the
    rewards of the step's rollouts (the prompts as rendered, the replies, the answers) and
    trains on what it answered (here the rules' scores, so the run also learns)."""
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "grpo"
    rules = AlignmentConfig(reward_weights={"exact_match": 1.0, "digits": 1.0})

    def score(request):
        return {"rewards": [reward(reply, answer, rules)
                            for reply, answer in zip(request["replies"], request["answers"])]}

    with reward_server(score) as (url, requests):
        run_llmtrain("stage=grpo", "data=prompts", f"data.data_path=[{data}]", *TINY,
                     "stage.alignment.max_new_tokens=8", "stage.alignment.reward=remote",
                     f"stage.alignment.reward_url={url}", "optim.lr=5e-3", "optim.min_lr=5e-3",
                     "stage.alignment.group_size=8", "stage.micro_batch_size=16",
                     "stage.global_batch_size=32", "stage.train_iters=10",
                     f"hydra.run.dir={run}", "checkpoint.save=null")
    assert len(requests) == 10 and all(len(r["replies"]) == 32 for r in requests)
    first = requests[0]
    assert len(first["prompts"]) == len(first["answers"]) == 32
    assert any(f"{a}+{b}=" in first["prompts"][0] for a in range(10) for b in range(10))
    assert set(first["answers"]) <= {str(n) for n in range(19)}
    rewards = summary(run)["metrics"]["reward"]
    for step, request in zip(rewards, requests):
        assert step == pytest.approx(mean(score(request)["rewards"]), rel=1e-6)
    assert_reward_rises(rewards)


def test_a_reward_server_that_answers_wrong_stops_the_run_with_its_answer(tmp_path):
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    with reward_server(lambda request: {"rewards": [0.5]}) as (url, _):
        out = run_llmtrain("stage=grpo", "data=prompts", f"data.data_path=[{data}]", *TINY,
                           "stage.alignment.max_new_tokens=4", "stage.alignment.reward=remote",
                           f"stage.alignment.reward_url={url}", "stage.micro_batch_size=8",
                           "stage.global_batch_size=8", "stage.train_iters=2",
                           f"hydra.run.dir={tmp_path / 'run'}", "checkpoint.save=null",
                           check=False)
    assert out.returncode == 1
    assert (f"llmtrain: the reward server at {url} answered 1 reward(s) ([0.5]); expected "
            f'{{"rewards": [8 numbers]}}, all finite') in out.stderr


def test_an_absent_reward_server_is_reported_after_retries():
    with reward_server(lambda request: {}) as (url, _):
        pass  # closed again: nothing listens on its port
    with pytest.raises(RoleServerError, match=(
            rf"the reward server at {url} did not answer \(.*\) in 3 tries: start it, or fix "
            rf"stage.alignment.reward_url")):
        remote_rewards(url, ["1+1="], ["2"], ["2"], timeout=5.0)


def test_grpo_with_its_reference_served_by_llmtrain_serve(tmp_path):
    """reference_url: the reference on a server of its own (`python -m llmtrain.serve` of the
    initial weights, echoing prompt log-probabilities), in place of a copy on the training
    ranks. The KL to it is the KL to the local reference, step for step."""
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    args = ["stage=grpo", "data=prompts", f"data.data_path=[{data}]", *TINY, *ROLLOUTS,
            "stage.alignment.group_size=4", "stage.micro_batch_size=8",
            "stage.global_batch_size=8", "checkpoint.save=null"]
    # The initial weights as a checkpoint: one step at learning rate 0.
    init = tmp_path / "init"
    run_llmtrain(*[a for a in args if a != "checkpoint.save=null"], "optim.lr=0",
                 "optim.min_lr=0", "stage.train_iters=1", "checkpoint.save_interval=1",
                 f"hydra.run.dir={init}")
    server = ServerProcess(f"load={init / 'checkpoints'}", "inference_max_batch_size=8")
    try:
        out = run_llmtrain(*args, "stage.train_iters=3", f"stage.alignment.reference_url="
                           f"{server.url}", f"hydra.run.dir={tmp_path / 'served'}").stdout
    finally:
        assert server.stop() == 0, server.output[-3000:]
    assert f"reference: served at {server.url}" in out
    run_llmtrain(*args, "stage.train_iters=3", f"hydra.run.dir={tmp_path / 'local'}")
    served, local = summary(tmp_path / "served"), summary(tmp_path / "local")
    assert served["metrics"]["kl"][0] == pytest.approx(0.0, abs=1e-5)
    assert served["metrics"]["kl"] == pytest.approx(local["metrics"]["kl"], rel=1e-3, abs=1e-5)
    assert local["metrics"]["kl"][-1] > 1e-3  # the policy moved: the later steps test the KL
    assert served["metrics"]["reward"] == pytest.approx(local["metrics"]["reward"], rel=1e-5)
