"""PPO's critic on ranks of its own: `python -m llmtrain.serve.critic`, started with the PPO run's
settings and a layout of its own (TP=2 over two processes for an actor of two pipeline stages;
two data-parallel replicas on each side), trains the critic in step with the actor as a
colocated critic does, saves its steps with the actor's, and gives a resumed run the critic of
its step."""

from __future__ import annotations

import pytest
from conftest import run_llmtrain, summary
from inference_helpers import ServerProcess
from rlhf_helpers import ROLLOUTS, TINY, arithmetic_prompts

LISTEN = "stage.alignment.critic_url=http://127.0.0.1:0"
TWO = ["launcher.nproc_per_node=2", "parallel=tp1pp1"]  # two data-parallel replicas


def ppo_args(data, run) -> list[str]:
    return ["stage=ppo", "data=prompts", f"data.data_path=[{data}]", *TINY, *ROLLOUTS,
            "stage.micro_batch_size=4", "stage.global_batch_size=8", f"hydra.run.dir={run}",
            "checkpoint.save_interval=2", "stage.alignment.critic_lr=1e-3"]


@pytest.mark.parametrize("actor, critic, critic_layout", [
    (["parallel=tp1pp2", "launcher.nproc_per_node=2"],
     ["parallel=tp2pp1", "launcher.nproc_per_node=2"], "TP 2 x PP 1 x DP 1"),
    (TWO, TWO, "TP 1 x PP 1 x DP 2")], ids=["actor_pp2-critic_tp2", "actor_dp2-critic_dp2"])
def test_ppo_with_a_served_critic_follows_a_colocated_one_and_resumes(tmp_path, actor, critic,
                                                                      critic_layout):
    """One request carries every actor replica's rollouts; the critic's replicas share them."""
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "served"
    args = ppo_args(data, run) + actor
    server = ServerProcess(*ppo_args(data, run), *critic, LISTEN, module="llmtrain.serve.critic")
    replicas = 2 if "DP 2" in critic_layout else 1
    try:
        assert f"{critic_layout} on 2 cpu process(es)" in server.output
        status, answer = server.send("/v1/critic/values", {"rows": [{"tokens": [1, 2],
                                                                     "start": 1}]})
        assert status == 409 and answer["error"]["message"].startswith(
            "the critic is not set up: POST /v1/critic/setup"), answer

        url = f"stage.alignment.critic_url={server.url}"
        out = run_llmtrain(*args, url, "stage.train_iters=2").stdout
        assert f"critic: served at {server.url}, {critic_layout}" in out
        critic = run / "checkpoints" / "critic"
        assert (critic / "iter_0000002").is_dir() and (run / "checkpoints" / "iter_0000002").is_dir()
        assert server.get("/v1/critic")["step"] == 2
        first = summary(run)["metrics"]

        status, answer = server.send("/v1/critic/train", {"rows": [
            {"tokens": [1, 2, 3], "start": 1, "old_values": [0.0], "returns": [1.0]}] * 2})
        assert status == 400 and answer["error"]["message"] == (
            f"2 rows: send a positive multiple of {4 * replicas} (micro batch size 4 x "
            f"{replicas} data-parallel replica(s) of the critic): the PPO run's "
            f"stage.global_batch_size, with the same stage.micro_batch_size; row 0: train "
            f"needs old_values and returns for each of its 2 positions from start; row 1: train "
            f"needs old_values and returns for each of its 2 positions from start"), answer

        out = run_llmtrain(*args, url, "stage.train_iters=3").stdout
        assert "resuming after step 2" in out
        assert "from step 2" in out.split("critic: served at")[1].split("\n")[0]
        assert f"[critic] loaded {critic / 'iter_0000002'}" in server.output
        resumed = summary(run)["metrics"]
    finally:
        assert server.stop() == 0, server.output[-3000:]

    # The same three steps with the critic on the training ranks, in one go.
    local = tmp_path / "local"
    run_llmtrain(*ppo_args(data, local), *actor, "stage.train_iters=3")
    expected = summary(local)["metrics"]
    for name in ("reward", "value_loss", "kl"):
        assert first[name] + resumed[name] == pytest.approx(expected[name], rel=1e-4,
                                                            abs=1e-6), name


def test_the_critic_server_refuses_a_run_without_a_critic_to_serve():
    process = run_llmtrain("stage=grpo", "data=prompts", module="llmtrain.serve.critic",
                           check=False)
    assert process.returncode == 2
    assert ("the critic server serves the critic of stage=ppo, not stage=grpo: give it the "
            "run's settings") in process.stderr
    assert "stage.alignment.critic_url must be set" in process.stderr
