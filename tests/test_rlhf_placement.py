"""Frozen roles on a tensor-parallel layout of their own: a run whose reference and reward
model take another TP size than the trained policy follows the run whose roles share the
policy's layout, step for step. Two cases on two processes: the roles whole on every rank
under a TP=2 policy (no communication, the role's own process groups), and the roles split
over two data-parallel replicas of the policy (each replica's rows gathered, run together, and
handed back to their own replica)."""

from __future__ import annotations

import math

import pytest
from conftest import run_llmtrain, summary
from rlhf_helpers import ROLLOUTS, TINY, arithmetic_prompts, separable_pairs

# The policy's layout, and the roles' own tensor-parallel size.
OWN = {"tp2": (["parallel=tp2pp1"], 1),
       "dp2": (["parallel=tp1pp1", "launcher.nproc_per_node=2"], 2)}


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm")
    pairs = separable_pairs(root / "pairs.jsonl", count=32)
    run_llmtrain("stage=rm", "data=preference", f"data.data_path=[{pairs}]", *TINY,
                 "stage.micro_batch_size=4", "stage.global_batch_size=8", "stage.train_iters=3",
                 f"hydra.run.dir={root / 'run'}")
    return root / "run" / "checkpoints"


def assert_same_steps(own: dict, shared: dict, exact: list[str], close: list[str]) -> None:
    """The same rollouts, scored alike, and training that agrees up to rounding: another TP
    size sums in another order, and normalising advantages over near-equal scores magnifies
    that (losses and value losses of ~3e-3 agree to ~3e-6); the KL of a policy that moved by
    0.09 in two steps drifts by up to 6e-3 of itself once a critic's rounding has steered its
    updates. A role that gave a replica another replica's outputs moved the mean reward (compared
    exactly) by 1e-3 after one step."""
    for name in exact:
        assert own["metrics"][name] == pytest.approx(shared["metrics"][name], rel=1e-5,
                                                     abs=1e-6)
    assert own["losses"] == pytest.approx(shared["losses"], abs=5e-5)
    for name in close:
        assert own["metrics"][name] == pytest.approx(shared["metrics"][name], rel=1e-2, abs=1e-6)


@pytest.mark.parametrize("case", OWN, ids=list(OWN))
def test_grpo_reference_and_reward_model_on_their_own_layout(tmp_path, reward_model, case):
    layout, role_tp = OWN[case]
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    args = ["stage=grpo", *layout, "data=prompts", f"data.data_path=[{data}]", *TINY, *ROLLOUTS,
            "stage.alignment.reward=model", f"stage.alignment.reward_load={reward_model}",
            "optim.lr=5e-3", "optim.min_lr=5e-3", "stage.micro_batch_size=4",
            "stage.global_batch_size=16", "stage.train_iters=3", "checkpoint.save=null"]
    results = {}
    for name, extra in (("shared", []), ("own", [
            f"stage.alignment.reference_tensor_model_parallel_size={role_tp}",
            f"stage.alignment.reward_tensor_model_parallel_size={role_tp}"])):
        out = run_llmtrain(*args, *extra, f"hydra.run.dir={tmp_path / name}").stdout
        results[name] = summary(tmp_path / name)
    assert f"frozen reference: tensor parallel {role_tp} over every rank" in out
    assert f"frozen scorer: tensor parallel {role_tp} over every rank" in out
    own, shared = results["own"], results["shared"]
    assert_same_steps(own, shared, ["reward"], ["kl", "entropy"])
    assert shared["metrics"]["kl"][-1] > 0.0  # the policy moved: later steps test the reference


def test_dpo_reference_on_its_own_layout_under_pipeline_parallelism(tmp_path):
    """The policy in two pipeline stages, the reference in none (TP=2 over both ranks)."""
    data = separable_pairs(tmp_path / "pairs.jsonl", count=32)
    args = ["stage=dpo", "parallel=tp1pp2", "data=preference", f"data.data_path=[{data}]",
            *TINY, "optim.lr=1e-4", "optim.min_lr=1e-4", "stage.micro_batch_size=2",
            "stage.global_batch_size=8", "stage.train_iters=3", "checkpoint.save=null"]
    out = run_llmtrain(*args, "stage.alignment.reference_tensor_model_parallel_size=2",
                       f"hydra.run.dir={tmp_path / 'own'}").stdout
    assert "frozen reference: tensor parallel 2 over every rank" in out
    run_llmtrain(*args, f"hydra.run.dir={tmp_path / 'shared'}")
    own, shared = summary(tmp_path / "own"), summary(tmp_path / "shared")
    assert_same_steps(own, shared, ["margin"], ["kl"])
    assert shared["metrics"]["kl"][-1] > 0.0


@pytest.mark.parametrize("case", OWN, ids=list(OWN))
def test_ppo_critic_trains_on_its_own_layout_and_resumes_on_the_runs(tmp_path, case):
    """The critic trained, saved and restored on its own layout; a later run loads its
    checkpoint into the run's layout (Megatron's distributed checkpoints reshard)."""
    layout, role_tp = OWN[case]
    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    args = ["stage=ppo", *layout, "data=prompts", f"data.data_path=[{data}]", *TINY, *ROLLOUTS,
            "stage.alignment.critic_lr=1e-3", "stage.micro_batch_size=4",
            "stage.global_batch_size=8", "checkpoint.save_interval=3"]
    own_roles = [f"stage.alignment.critic_tensor_model_parallel_size={role_tp}",
                 f"stage.alignment.reference_tensor_model_parallel_size={role_tp}"]
    out = run_llmtrain(*args, *own_roles, "stage.train_iters=3",
                       f"hydra.run.dir={tmp_path / 'own'}").stdout
    assert f"critic: tensor parallel {role_tp} over every rank" in out
    run_llmtrain(*args, "stage.train_iters=3", f"hydra.run.dir={tmp_path / 'shared'}")
    own, shared = summary(tmp_path / "own"), summary(tmp_path / "shared")
    assert_same_steps(own, shared, ["reward"], ["value_loss", "kl"])
    assert shared["metrics"]["value_loss"][-1] > 0.0
    # Over the whole vocabulary, however TP splits it.
    assert 0.0 < shared["metrics"]["entropy"][0] <= math.log(4096) + 1e-3

    out = run_llmtrain(*args, "stage.train_iters=4", f"hydra.run.dir={tmp_path / 'own'}").stdout
    critic = tmp_path / "own" / "checkpoints" / "critic" / "iter_0000003"
    assert f"critic: loaded {critic}; resuming after step 3" in out
    assert "over every rank" not in out
    assert summary(tmp_path / "own")["start_step"] == 3


def test_layouts_benchmark_compares_the_stages_measures(tmp_path):
    """`python -m llmtrain.bench.layouts --metric ...`, the GPU checklist's `roles` step: the
    largest difference of each measure from the first layout, per layout."""
    data = separable_pairs(tmp_path / "pairs.jsonl", count=16)
    out = run_llmtrain(
        "--metric", "kl", "--metric", "margin", "--layout", "",
        "--layout", "stage.alignment.reference_tensor_model_parallel_size=1",
        "--", "stage=dpo", "parallel=tp2pp1", "data=preference", f"data.data_path=[{data}]",
        *TINY, "stage.micro_batch_size=2", "stage.global_batch_size=4", "stage.train_iters=2",
        "checkpoint.save=null", module="llmtrain.bench.layouts").stdout
    table = out[out.index("layout: max |d metric|"):].splitlines()
    assert table[0].split()[-2:] == ["kl", "margin"]
    assert table[1].split() == ["(reference)", "0.00e+00", "0.00e+00"]
    name, kl, margin = table[2].rsplit(maxsplit=2)
    assert name.startswith("stage.alignment.reference_tensor_model_parallel_size=1")
    assert float(kl) < 1e-6 and float(margin) < 1e-6
