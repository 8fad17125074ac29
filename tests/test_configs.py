"""Every shipped config group composes; each combination is valid or fails with its exact message."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import compose_config, run_llmtrain
from test_convert_zoo import CONVERSION_ZOO
from llmtrain.cli import CONF_DIR, resolve, resolve_run
from llmtrain.config.layout import Machine
from llmtrain.config.plan import describe
from llmtrain.config.schema import Config
from llmtrain.config.validate import ConfigError, validate

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())
OPTIONS = {g: sorted(f.stem for f in (Path(CONF_DIR) / g).glob("*.yaml")) for g in GROUPS}
CPU = Machine(gpus=0, has_transformer_engine=False)

FP8_ON_CPU = ("precision=fp8 needs NVIDIA Transformer Engine and a GPU; install llmtrain[gpu] on "
              "a GPU machine or use precision=bf16")


# Model x parallel layouts that cannot work, with the message users get.
SHAPE_PROBLEMS = {
    ("tiny", "tp8pp1"): "model tiny has 4 KV groups (num_query_groups), which tensor parallel "
                        "size 8 does not divide: choose a TP that divides it",
    ("tiny_moe", "tp8pp1"): "model tiny_moe has 4 KV groups (num_query_groups), which tensor "
                            "parallel size 8 does not divide: choose a TP that divides it",
    ("qwen2_7b", "tp8pp1"): "model qwen2_7b has 28 attention heads, which tensor parallel size 8 "
                            "does not divide: choose a TP that divides it",
}


def expected_problems(choice: dict[str, str]) -> list[str]:
    """The problems validation must report on a CPU machine, written out by hand."""
    problems = []
    if (choice["model"], choice["parallel"]) in SHAPE_PROBLEMS:
        problems.append(SHAPE_PROBLEMS[choice["model"], choice["parallel"]])
    if choice["model"] == "gpt2_345m" and choice["data"] in ("mock", "indexed"):
        problems.append("data.seq_length=4096 exceeds the 1024 learned positions of model "
                        "gpt2_345m: set data.seq_length=1024 or less")
    if choice["precision"] == "fp8":
        problems.append(FP8_ON_CPU)
    if choice["data"] == "indexed":
        problems += ["data=indexed needs data.data_path: the prefixes written by `python -m "
                     "llmtrain.data tokenize` (optionally weighted)",
                     "data.tokenizer.tokenizer_type=huggingface needs "
                     "data.tokenizer.tokenizer_model (the tokenizer the data was made with)"]
    return problems


# The zoo entries added with checkpoint conversion (published sizes of more families) are checked
# by tests/test_convert_zoo.py. Launchers decide who starts the workers, not what a config
# validates to, and experiments are whole recipes that set the other groups themselves: both are
# checked one by one (test_every_launcher_composes, test_every_experiment_is_valid_where_it_is_
# meant_to_run). The sft and alignment stages are checked against every data option
# (test_sft_stage_with_every_data_option, test_alignment_stage_with_every_data_option), peft=lora
# in tests/test_lora.py; the compositions below keep stage=pretrain and peft=none.
ALIGNMENT_STAGES = {"rm": "preference", "dpo": "preference", "kto": "unpaired", "grpo": "prompts",
                    "ppo": "prompts"}
ALIGNMENT_DATA = sorted(set(ALIGNMENT_STAGES.values()))
COMPOSED = {**OPTIONS, "model": [m for m in OPTIONS["model"] if m not in CONVERSION_ZOO],
           "stage": ["pretrain"], "peft": ["none"], "data": [d for d in OPTIONS["data"] if d not in ALIGNMENT_DATA]}
COMBO_GROUPS = [g for g in GROUPS if g not in ("launcher", "experiment")]
# Each option composed once (row i takes option i of every group, round the shorter groups), and
# the pairs that interact composed together: a cross product would repeat each option hundreds
# of times for the same answer.
COMBOS = [{g: COMPOSED[g][i % len(COMPOSED[g])] for g in COMBO_GROUPS}
          for i in range(max(len(options) for options in COMPOSED.values()))]
COMBOS += [{**COMBOS[0], **pair} for pair in
           [{"model": m, "parallel": p} for m, p in SHAPE_PROBLEMS] +
           [{"model": "gpt2_345m", "data": d} for d in ("mock", "indexed")]]


def _problems(choice: dict[str, str]) -> list[str]:
    overrides = [f"{group}={option}" for group, option in choice.items()]
    try:
        validate(resolve(compose_config(*overrides, typed=False)), CPU)
    except ConfigError as error:
        return error.problems
    return []


def wrong_stage_for(data: str, stage: str) -> list[str]:
    """The problem of alignment data read by a stage that does not take it."""
    if data not in ALIGNMENT_DATA or ALIGNMENT_STAGES.get(stage) == data:
        return []
    users = {"preference": "rm or dpo", "unpaired": "kto", "prompts": "grpo or ppo"}[data]
    return [f"data.kind={data} is read by stage={users}, not stage={stage}"]


@pytest.mark.parametrize("data", OPTIONS["data"])
def test_sft_stage_with_every_data_option(data):
    expected = [] if data == "sft" else [
        f"stage.epochs needs a dataset of known size (data.kind=sft), not data.kind={data}: set "
        f"stage.epochs=null and choose stage.train_iters"]
    if data == "indexed":
        expected += expected_problems({"model": "tiny", "parallel": "tp1pp1",
                                       "precision": "fp32", "data": data})
    expected += wrong_stage_for(data, "sft")
    assert sorted(_problems({"stage": "sft", "data": data})) == sorted(expected)


@pytest.mark.parametrize("data", OPTIONS["data"])
@pytest.mark.parametrize("stage", sorted(ALIGNMENT_STAGES))
def test_alignment_stage_with_every_data_option(stage, data):
    wanted = ALIGNMENT_STAGES[stage]
    expected = wrong_stage_for(data, stage)
    if data != wanted:
        expected.append(f"stage={stage} reads {wanted} data: use data={wanted} (not "
                        f"data.kind={data})")
    if data == "indexed":
        expected += expected_problems({"model": "tiny", "parallel": "tp1pp1",
                                       "precision": "fp32", "data": data})
    assert sorted(_problems({"stage": stage, "data": data})) == sorted(expected)


@pytest.mark.parametrize("data", ALIGNMENT_DATA)
def test_alignment_data_needs_an_alignment_stage(data):
    assert _problems({"stage": "pretrain", "data": data}) == wrong_stage_for(data, "pretrain")


def test_alignment_settings_are_checked_together():
    cfg = compose_config("stage=grpo", "data=prompts", "parallel=tp1pp1",
                         "launcher.nproc_per_node=2", "stage.global_batch_size=30",
                         "stage.micro_batch_size=3", "stage.alignment.group_size=8",
                         "stage.alignment.reward=model", "stage.alignment.max_new_tokens=500",
                         "stage.eval_interval=5")
    with pytest.raises(ConfigError) as error:
        validate(cfg, CPU)
    assert sorted(error.value.problems) == sorted([
        "stage=grpo gives each data-parallel replica whole groups: the 3 prompts of a step "
        "(global_batch_size / group_size) must divide among DP 2",
        "stage.alignment.reward=model needs stage.alignment.reward_load: a checkpoint written by "
        "stage=rm",
        "stage.global_batch_size=30 (replies per step) must be a multiple of "
        "stage.alignment.group_size=8 (replies per prompt)",
        "stage.alignment.max_new_tokens=500 must lie in 1..127 (below data.seq_length, which "
        "also holds the prompt)",
        "stage=grpo has no evaluation pass yet: set stage.eval_interval=0",
    ])
    with pytest.raises(ConfigError) as error:
        validate(compose_config("stage=dpo", "data=preference", "stage.alignment.beta=0",
                                "stage.alignment.loss_type=hinge"), CPU)
    assert sorted(error.value.problems) == [
        "stage.alignment.beta=0.0 must be above 0",
        "stage.alignment.loss_type=hinge is not one of: sigmoid, ipo, simpo, orpo"]


def test_every_group_has_options():
    for group in ("model", "parallel", "precision", "data", "stage", "optim", "checkpoint",
                  "logging", "launcher"):
        assert OPTIONS.get(group), f"conf/{group}/ has no options"
    for name in ("tiny", "gpt2_345m", "llama3_2_1b", "llama3_8b", "llama3_1_8b", "llama3_70b",
                 "qwen2_7b"):
        assert name in OPTIONS["model"]
    for name in ("tp1pp1", "tp2pp1", "tp1pp2", "tp2pp2", "tp4pp2", "tp8pp1"):
        assert name in OPTIONS["parallel"]


@pytest.mark.parametrize("choice", COMBOS, ids=lambda c: "-".join(c.values()))
def test_combination_is_valid_or_expected_invalid(choice):
    assert sorted(_problems(choice)) == sorted(expected_problems(choice))


@pytest.mark.parametrize("launcher", OPTIONS["launcher"])
def test_every_launcher_composes(launcher):
    assert _problems({"launcher": launcher}) == []


# What a user adds on the command line to an experiment: their data and tokenizer.
EXPERIMENT_PATHS = ["data.data_path=[/data/corpus_text_document]",
                    "data.tokenizer.tokenizer_model=/models/hf", "data.tokenizer.vocab_file=/v.json",
                    "data.tokenizer.merge_file=/m.txt"]


@pytest.mark.parametrize("experiment", OPTIONS["experiment"])
def test_every_experiment_is_valid_where_it_is_meant_to_run(experiment):
    cfg = compose_config(f"experiment={experiment}", *EXPERIMENT_PATHS, typed=False)
    layout = validate(resolve_run(cfg), Machine(gpus=8, has_transformer_engine=True))
    assert layout.world_size == 8
    assert cfg.name == experiment
    with pytest.raises(ConfigError) as error:  # without the data, the user is told what to set
        validate(resolve_run(compose_config(f"experiment={experiment}", typed=False)),
                 Machine(gpus=8, has_transformer_engine=True))
    assert any("needs data.data_path" in p for p in error.value.problems)


def test_validation_reports_every_problem_at_once():
    cfg = compose_config("model=tiny", "parallel=tp8pp1", "stage.global_batch_size=6",
                         "stage.micro_batch_size=4", "data.seq_length=100",
                         "parallel.context_parallel_size=3", "parallel.sequence_parallel=true",
                         "stage.train_iters=20", "logging.profile=true",
                         "logging.profile_step_start=5", "logging.profile_step_end=4",
                         "precision.use_te_op_fuser=true")
    with pytest.raises(ConfigError) as error:
        validate(cfg, CPU)
    assert sorted(error.value.problems) == sorted([
        "logging.profile needs 1 <= profile_step_start (5) <= profile_step_end (4) <= "
        "stage.train_iters (20)",
        "precision.use_te_op_fuser=true needs Transformer Engine's layers (a GPU with "
        "llmtrain[gpu] installed) and a dense SwiGLU MLP without parallel.cpu_offloading or "
        "LoRA adapters on linear_fc1/linear_fc2; leave it unset to choose automatically",
        "model tiny has 4 KV groups (num_query_groups), which tensor parallel size 8 does not "
        "divide: choose a TP that divides it",
        "data.seq_length=100 must be divisible by 2 x context parallel size = 6",
        "parallel.context_parallel_size > 1 needs Transformer Engine's attention (a GPU with "
        "llmtrain[gpu] installed)",
        "parallel.sequence_parallel=true needs Transformer Engine's layers (a GPU with "
        "llmtrain[gpu] installed); leave it unset to choose automatically",
        "stage.global_batch_size=6 is not divisible by micro_batch_size 4 x data parallel size "
        "1 = 4: choose a multiple of 4",
    ])


def test_layout_on_a_gpu_machine():
    eight = Machine(gpus=8, has_transformer_engine=True)
    layout = validate(compose_config("model=llama3_8b", "parallel=tp2pp1",
                                     "stage.global_batch_size=64"), eight)
    assert (layout.world_size, layout.data_parallel_size, layout.sequence_parallel) == (8, 4, True)
    assert layout.num_microbatches == 4
    with pytest.raises(ConfigError) as error:
        validate(compose_config("model=llama3_8b", "parallel=tp4pp2"),
                 Machine(gpus=1, has_transformer_engine=True))
    assert error.value.problems == [
        "parallel=tp4pp2 needs 8 GPUs (TP 4 x PP 2 x CP 1 x DP 1) but this machine has 1: "
        "choose a smaller layout or more GPUs"]


def test_world_size_must_equal_tp_pp_cp_dp():
    cfg = compose_config("parallel=tp2pp1", "launcher.nproc_per_node=3")
    with pytest.raises(ConfigError) as error:
        validate(cfg, CPU)
    assert error.value.problems == [
        "world size 3 is not a multiple of TP 2 x PP 1 x CP 1 = 2: set launcher.nproc_per_node "
        "to a multiple of 2"]


def test_pipeline_stages_that_do_not_split_the_layers_name_the_uneven_options():
    """tiny's 4 layers: PP 3 splits them only unevenly (1 + 2 + 1 is refused: the middle
    stage takes what is left, 2; 1 + 1 + 2 is fine), and each stage must hold VPP's chunks."""
    def problems(*overrides):
        try:
            validate(compose_config("parallel=tp1pp1", "parallel.pipeline_model_parallel_size=3",
                                    "launcher.nproc_per_node=3", *overrides), CPU)
        except ConfigError as error:
            return error.problems
        return []

    assert problems() == [
        "model tiny has 4 layers, which pipeline parallel size 3 does not divide: choose a "
        "layout whose stages divide the layers, or give the first and last stages counts of "
        "their own (parallel.num_layers_in_first_pipeline_stage, "
        "parallel.num_layers_in_last_pipeline_stage)"]
    assert problems("parallel.num_layers_in_first_pipeline_stage=2") == []
    cfg = compose_config("parallel=tp1pp1", "parallel.pipeline_model_parallel_size=3",
                         "launcher.nproc_per_node=3",
                         "parallel.num_layers_in_first_pipeline_stage=2")
    assert "(4 layers: 2 + 1 + 1 over the pipeline stages, hidden 256" in describe(
        cfg, validate(cfg, CPU))
    assert problems("parallel.num_layers_in_first_pipeline_stage=3") == [
        "model tiny has 4 layers, which parallel.num_layers_in_first_pipeline_stage=3 and "
        "num_layers_in_last_pipeline_stage=None cannot split over 3 pipeline stages: the other "
        "stages must share the rest evenly, at least one layer each"]
    assert ("model tiny's pipeline stages hold [2, 1, 1] layers, which VPP 2 does not divide: "
            "choose a VPP size (or stage sizes) that divides each") in problems(
        "parallel.num_layers_in_first_pipeline_stage=2",
        "parallel.virtual_pipeline_model_parallel_size=2")


def test_moe_routing_settings_are_checked_together():
    cfg = compose_config("model=tiny_moe", "model.moe_router_topk=1",
                         "model.moe_router_enable_expert_bias=true",
                         "model.moe_pad_expert_input_to_capacity=true",
                         "model.moe_router_group_topk=3", "model.moe_router_num_groups=3",
                         "model.moe_token_drop_policy=first")
    with pytest.raises(ConfigError) as error:
        validate(cfg, CPU)
    assert error.value.problems == [
        "model.moe_token_drop_policy=first is not one of: probs, position",
        "model.moe_router_topk=1 with softmax scores needs model.moe_router_pre_softmax=true (a "
        "softmax over the one chosen logit is always 1: the router would get no gradient)",
        "model.moe_router_enable_expert_bias=true (aux-loss-free balancing) needs "
        "model.moe_router_score_function=sigmoid",
        "model.moe_pad_expert_input_to_capacity=true pads up to a capacity: set "
        "model.moe_expert_capacity_factor too",
        "model.moe_router_group_topk=3 (group-limited routing) needs model.moe_router_num_groups "
        "dividing the 4 experts, at least as many as the groups chosen (it is 3)"]


def test_gpt_oss_attention_and_gated_unit_settings_are_checked_together():
    """The window pattern without a window, a clamp on SwiGLU (Megatron-Core clamps
    quick_geglu only) and an unrounded YaRN ramp under multi-latent attention (whose YaRN
    rounds) are each named."""
    cfg = compose_config("model=gpt_oss_20b", "model.window_size=null", "model.activation=swiglu",
                         "model.softmax_type=sinks")
    with pytest.raises(ConfigError) as error:
        validate(cfg, CPU)
    assert error.value.problems == [
        "model.softmax_type=sinks is not one of: vanilla, off-by-one, learnable",
        "model.window_attn_skip_freq needs model.window_size (the window of the layers that have "
        "one)",
        "model.activation_func_clamp_value: Megatron-Core clamps the gated unit of "
        "activation=quick_geglu only"]
    cfg = compose_config("model=deepseek_v2_lite", "model.yarn_correction_range_round_to_int=false")
    with pytest.raises(ConfigError) as error:
        validate(cfg, CPU)
    assert error.value.problems == [
        "model.yarn_correction_range_round_to_int=false applies to rope_type=yarn outside "
        "multi-latent attention (whose YaRN always rounds)"]


def test_dry_run_prints_the_plan():
    out = run_llmtrain("model=llama3_8b", "parallel=tp4pp2", "device=cuda", "precision=bf16",
                       "data=mock", "data.seq_length=8192", "stage.micro_batch_size=1",
                       "stage.global_batch_size=128", "dry_run=true").stdout
    assert "planning for 8 GPUs per node with Transformer Engine" in out
    # 8.030 B as published, plus 256 rows that pad the vocabulary to 128 x TP 4.
    assert "llama3_8b: 8.032 B parameters" in out
    assert "(pretrain, bf16, cuda)" in out
    assert "TP 4  PP 2  CP 1  EP 1  DP 1" in out
    assert "128 micro-batches per step" in out
    assert "weights" in out and "optimizer" in out and "activations" in out


def test_unknown_group_option_lists_the_choices():
    process = run_llmtrain("model=llama9", check=False)
    assert process.returncode != 0
    assert "Could not find 'model/llama9'" in process.stderr
    for name in ("tiny", "llama3_8b", "qwen2_7b"):
        assert name in process.stderr


def test_invalid_combination_stops_before_starting():
    process = run_llmtrain("parallel=tp8pp1", "precision=fp8", check=False)
    assert process.returncode == 2
    assert process.stderr.startswith("llmtrain: the configuration has 2 problem(s):")
    assert FP8_ON_CPU in process.stderr
    assert "training" not in process.stdout


def test_gpu_run_on_a_machine_without_gpus():
    process = run_llmtrain("device=cuda", check=False)
    assert process.returncode == 2
    assert "device=cuda was asked for but this machine has no GPU" in process.stderr


def test_misspelt_key_is_a_composition_error():
    process = run_llmtrain("optim.learning_rate=1e-4", check=False)
    assert process.returncode != 0
    assert "learning_rate" in process.stderr


def refused(*overrides: str, machine: Machine = CPU) -> list[str]:
    """The problems, sorted, that validation finds in `python -m llmtrain <overrides>`."""
    with pytest.raises(ConfigError) as error:
        validate(compose_config(*overrides), machine)
    return sorted(error.value.problems)


def test_role_layouts_are_checked_together():
    assert refused("stage=grpo", "data=prompts", "parallel=tp1pp1", "launcher.nproc_per_node=4",
                   "stage.global_batch_size=32", "stage.micro_batch_size=4",
                   "stage.alignment.reference_tensor_model_parallel_size=3",
                   "stage.alignment.reward_tensor_model_parallel_size=2") == [
        "stage.alignment.reference_tensor_model_parallel_size=3 must divide the 4 processes: "
        "the reference model lies over every rank in groups of that size",
        "stage.alignment.reward_tensor_model_parallel_size=2 applies to stage=grpo or ppo with "
        "a reward model (stage.alignment.reward=model, or combined with reward_weights.model), "
        "not this run: unset it"]
    assert refused("stage=dpo", "data=preference", "parallel=tp1pp1",
                   "launcher.nproc_per_node=8", "stage.global_batch_size=16",
                   "stage.micro_batch_size=2", "model.make_vocab_size_divisible_by=1",
                   "model.vocab_size=4097",
                   "stage.alignment.reference_tensor_model_parallel_size=8") == [
        "model tiny has 4 KV groups (num_query_groups), which "
        "stage.alignment.reference_tensor_model_parallel_size=8 does not divide: choose a TP "
        "that divides it",
        "stage.alignment.reference_tensor_model_parallel_size=8 does not divide the padded "
        "vocabulary (4097): choose a size that divides it"]
    assert refused("stage.alignment.reference_tensor_model_parallel_size=1") == [
        "stage.alignment.reference_tensor_model_parallel_size=1 applies to stage=dpo, kto, grpo "
        "or ppo, not this run: unset it"]


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_rollout_stages_keep_sequences_whole_under_tensor_parallelism(stage):
    """Rollouts come from the trained model, which generation cannot run with its sequences
    split: sequence parallelism is left off (it is on by default for TP > 1 on GPUs)."""
    gpus = Machine(gpus=2, has_transformer_engine=True)
    rollout = [f"stage={stage}", "data=prompts", "parallel=tp2pp1", "stage.global_batch_size=8",
               "stage.micro_batch_size=4"]
    assert validate(compose_config(*rollout), gpus).sequence_parallel is False
    assert validate(compose_config("parallel=tp2pp1"), gpus).sequence_parallel is True
    assert refused(*rollout, "parallel.sequence_parallel=true", machine=gpus) == [
        f"stage={stage} generates its rollouts with the trained model, which cannot run under "
        f"sequence parallelism: set parallel.sequence_parallel=false (or leave it unset)"]
    # A PPO critic server generates nothing: its layout splits sequences as training's does.
    if stage == "ppo":
        assert validate(compose_config(*rollout), gpus, generates=False).sequence_parallel


def test_a_critic_server_shares_its_rollouts_among_its_replicas_without_whole_groups():
    """Its replicas split the step's micro-batches; only generating replicas need whole groups."""
    ppo = ["stage=ppo", "data=prompts", "parallel=tp1pp1", "launcher.nproc_per_node=4",
           "stage.alignment.group_size=4", "stage.global_batch_size=8", "stage.micro_batch_size=2"]
    assert refused(*ppo) == [
        "stage=ppo gives each data-parallel replica whole groups: the 2 prompts of a step "
        "(global_batch_size / group_size) must divide among DP 4"]
    assert validate(compose_config(*ppo), CPU, generates=False).data_parallel_size == 4


def test_roles_on_servers_need_their_addresses():
    grpo = ["stage=grpo", "data=prompts", "stage.alignment.reward=remote"]
    assert refused(*grpo, "stage.alignment.server_timeout=0") == [
        "stage.alignment.reward=remote needs stage.alignment.reward_url: the http:// or https:// "
        "address of a reward server (docs/rlhf.md)",
        "stage.alignment.server_timeout=0.0 must be above 0 (seconds)"]
    assert refused(*grpo, "stage.alignment.reward_url=localhost:8000") == [
        "stage.alignment.reward_url=localhost:8000 is not an http:// or https:// address"]
    assert validate(compose_config(*grpo, "stage.alignment.reward_url=http://rm:8000/score"),
                    CPU).world_size == 1
    assert refused("stage=ppo", "data=prompts", "stage.alignment.reference_url=ref",
                   "stage.alignment.reference_load=/ckpt") == [
        "stage.alignment.reference_url serves the reference elsewhere: unset reference_load and "
        "reference_tensor_model_parallel_size (the server loads the reference)",
        "stage.alignment.reference_url=ref is not an http:// or https:// address"]
    assert refused("stage=dpo", "data=preference",
                   "stage.alignment.reference_url=http://ref:5000") == [
        "stage.alignment.reference_url applies to stage=grpo or ppo, not stage=dpo: unset it"]
    assert refused("stage=grpo", "data=prompts", "stage.alignment.critic_url=http://c:5002") == [
        "stage.alignment.critic_url applies to stage=ppo, not stage=grpo: unset it"]
    assert refused("stage=ppo", "data=prompts", "stage.alignment.critic_url=c:5002",
                   "stage.alignment.critic_tensor_model_parallel_size=1") == [
        "stage.alignment.critic_url serves the critic elsewhere, with the server's own layout: "
        "unset critic_tensor_model_parallel_size",
        "stage.alignment.critic_url=c:5002 is not an http:// or https:// address"]


def test_reward_rules_and_policy_gradient_names_are_checked():
    """A misspelt rule (exactmatch for exact_match: added with +, as Hydra suggests) once passed
    validation and crashed with a KeyError at the first step."""
    assert refused("stage=grpo", "data=prompts",
                   "+stage.alignment.reward_weights.exactmatch=1") == [
        "stage.alignment.reward_weights names exactmatch, which is no reward rule or score; the "
        "rules are: exact_match, format, digits, math, code; the scores (with reward=combined): "
        "model, remote"]
    assert refused("stage=grpo", "data=prompts", "stage.alignment.advantage_estimator=ppo",
                   "stage.alignment.policy_loss=gpg", "stage.alignment.loss_agg_mode=mean",
                   "stage.alignment.kl_estimator=k4") == [
        "stage.alignment.advantage_estimator=ppo is not one of: grpo, rloo, "
        "reinforce_plus_plus, gae",
        "stage.alignment.kl_estimator=k4 is not one of: k1, k2, k3",
        "stage.alignment.loss_agg_mode=mean is not one of: token-mean, seq-mean-token-mean, "
        "seq-mean-token-sum-norm",
        "stage.alignment.policy_loss=gpg is not one of: vanilla, gspo"]
    assert refused("stage=grpo", "data=prompts", "stage.alignment.advantage_estimator=gae") == [
        "stage=grpo has no critic: stage.alignment.advantage_estimator=gae does not fit it; use "
        "grpo, rloo or reinforce_plus_plus"]
    assert refused("stage=ppo", "data=prompts", "stage.alignment.advantage_estimator=rloo") == [
        "stage.alignment.advantage_estimator=rloo compares replies within a group: "
        "stage.alignment.group_size must be at least 2",
        "stage=ppo has a critic: stage.alignment.advantage_estimator=rloo does not fit it; use "
        "gae"]
    assert refused("stage=grpo", "data=prompts", "stage.alignment.filter_groups=true",
                   "stage.alignment.max_sampling_rounds=0",
                   "stage.alignment.overlong_buffer_len=40") == [
        "stage.alignment.filter_groups drops groups whose replies all score the same: it needs "
        "group_size >= 2 and max_sampling_rounds >= 1",
        "stage.alignment.overlong_buffer_len=40 must lie in 0..max_new_tokens (16)"]
    validate(compose_config("stage=grpo", "data=prompts", "stage.alignment.reward_weights.math=1",
                            "stage.alignment.advantage_estimator=rloo"), CPU)
    # Rules and a reward model's or a server's score in one sum (reward=combined): each score
    # needs its source, and only combined weighs them.
    assert refused("stage=grpo", "data=prompts", "stage.alignment.reward=combined",
                   "stage.alignment.reward_weights.model=0.5",
                   "stage.alignment.reward_weights.remote=2") == [
        "stage.alignment.reward=combined with reward_weights.model needs "
        "stage.alignment.reward_load: a checkpoint written by stage=rm",
        "stage.alignment.reward=combined with reward_weights.remote needs "
        "stage.alignment.reward_url: the http:// or https:// address of a reward server "
        "(docs/rlhf.md)"]
    assert refused("stage=grpo", "data=prompts", "stage.alignment.reward=combined") == [
        "stage.alignment.reward=combined adds a reward model's score (reward_weights.model, with "
        "reward_load) or a server's (reward_weights.remote, with reward_url) to the rules: weigh "
        "one of them, or use reward=rule"]
    assert refused("stage=grpo", "data=prompts", "stage.alignment.reward=model",
                   "stage.alignment.reward_load=/ckpt/rm",
                   "stage.alignment.reward_weights.model=0.5") == [
        "stage.alignment.reward_weights.model weighs a score in the sum with the rules that "
        "reward=combined makes, not reward=model: set stage.alignment.reward=combined, or drop "
        "reward_weights.model"]
    assert refused("stage=grpo", "data=prompts", "stage.alignment.reward=sum") == [
        "stage.alignment.reward=sum is not one of: rule, model, remote, combined"]


def test_reference_free_preference_losses_take_no_reference():
    assert refused("stage=dpo", "data=preference", "stage.alignment.loss_type=simpo",
                   "stage.alignment.reference_load=/ckpt/sft") == [
        "stage.alignment.loss_type=simpo uses no reference model: unset "
        "stage.alignment.reference_load"]
    assert refused("stage=dpo", "data=preference", "stage.alignment.loss_type=orpo",
                   "stage.alignment.reference_tensor_model_parallel_size=1") == [
        "stage.alignment.reference_tensor_model_parallel_size=1 applies to stage=dpo, kto, grpo "
        "or ppo, not this run: unset it"]
