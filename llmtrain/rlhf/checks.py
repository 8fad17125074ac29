"""What validation checks of the alignment stages and their data (pure Python, like
llmtrain.config.validate, which calls this): the checks every stage shares, keyed on what the
stage registry (llmtrain.tasks) says of each stage, and each family's own."""

from __future__ import annotations

from llmtrain.config.schema import AlignmentConfig, Config
from llmtrain.rlhf.advantages import ESTIMATORS
from llmtrain.rlhf.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES, PREFERENCE_LOSSES
from llmtrain.rlhf.rewards import RULES, SCORES, SOURCES, weights
from llmtrain.tasks import either, stages_where, task_spec

ALIGNMENT_DATA = ("preference", "unpaired", "prompts")


def _not_one_of(setting: str, value, choices) -> list[str]:
    return [] if value in choices else [
        f"stage.alignment.{setting}={value} is not one of: {', '.join(choices)}"]


def alignment_problems(cfg: Config, data_parallel_size: int, generates: bool = True
                       ) -> list[str]:
    """`generates`: whether the processes generate rollouts (a critic server's do not)."""
    stage, data, a = cfg.stage, cfg.data, cfg.stage.alignment
    spec = task_spec(stage.name)
    if spec is None:
        return []  # validation names the unknown stage
    problems = []
    alignment = spec.data_kinds[0] in ALIGNMENT_DATA
    if data.kind in ALIGNMENT_DATA and data.kind not in spec.data_kinds:
        users = either(stages_where(lambda s: data.kind in s.data_kinds))
        problems.append(f"data.kind={data.kind} is read by stage={users}, not stage={stage.name}")
    if not alignment:
        return problems
    wanted = spec.data_kinds[0]
    if data.kind not in spec.data_kinds:
        problems.append(f"stage={stage.name} reads {wanted} data: use data={wanted} (not "
                        f"data.kind={data.kind})")
    if data.kind in spec.data_kinds and not data.data_path:
        problems.append(f"data={data.kind} needs data.data_path: json/jsonl/parquet files (see "
                        f"docs/rlhf.md) or arithmetic")
    if stage.eval_interval:
        problems.append(f"stage={stage.name} has no evaluation pass yet: set stage.eval_interval=0")
    if stage.epochs is not None:
        problems.append(f"stage={stage.name} runs stage.train_iters steps: set stage.epochs=null")
    if cfg.parallel.virtual_pipeline_model_parallel_size:
        problems.append(f"stage={stage.name} runs without virtual pipeline stages: unset "
                        f"parallel.virtual_pipeline_model_parallel_size")
    if a.reference_url and not spec.generates:
        problems.append(f"stage.alignment.reference_url applies to stage="
                        f"{either(stages_where(lambda s: s.generates))}, not "
                        f"stage={stage.name}: unset it")
    if a.critic_url and "critic" not in spec.possible_roles:
        problems.append(f"stage.alignment.critic_url applies to stage="
                        f"{either(stages_where(lambda s: 'critic' in s.possible_roles))}, not "
                        f"stage={stage.name}: unset it")
    return problems + spec.checks(cfg, data_parallel_size, generates)


def preference_problems(cfg: Config, data_parallel_size: int, generates: bool) -> list[str]:
    """stage=dpo: the loss and the reference."""
    a = cfg.stage.alignment
    problems = _not_one_of("loss_type", a.loss_type, PREFERENCE_LOSSES)
    if a.beta <= 0:
        problems.append(f"stage.alignment.beta={a.beta} must be above 0")
    problems += _not_one_of("reference_logprobs", a.reference_logprobs,
                            ("on_the_fly", "precomputed"))
    loss = PREFERENCE_LOSSES.get(a.loss_type)
    if loss and not loss.uses_reference and a.reference_load:
        problems.append(f"stage.alignment.loss_type={a.loss_type} uses no reference model: "
                        f"unset stage.alignment.reference_load")
    return problems


def kto_problems(cfg: Config, data_parallel_size: int, generates: bool) -> list[str]:
    """stage=kto: its strength and weights; the settings of DPO's losses do not apply."""
    a = cfg.stage.alignment
    problems = [f"stage.alignment.{key}={getattr(a, key)} must be above 0"
                for key in ("beta", "desirable_weight", "undesirable_weight")
                if getattr(a, key) <= 0]
    if a.loss_type != AlignmentConfig.loss_type:
        problems.append(f"stage.alignment.loss_type={a.loss_type} chooses stage=dpo's loss; "
                        f"stage=kto has its own: unset it")
    if cfg.stage.global_batch_size < 2:
        problems.append("stage=kto pairs each prompt with another example's completion of the "
                        "step (its reference point): stage.global_batch_size must be at least 2")
    if a.reference_logprobs != "on_the_fly":
        problems.append(f"stage.alignment.reference_logprobs={a.reference_logprobs}: stage=kto "
                        f"computes the reference's log-probabilities every step (its reference "
                        f"point pairs each prompt with another example's completion of the "
                        f"step): set it to on_the_fly")
    return problems


def rollout_problems(cfg: Config, data_parallel_size: int, generates: bool) -> list[str]:
    """stage=grpo and ppo: rollouts, rewards, their servers and the policy-gradient settings."""
    stage, data, a = cfg.stage, cfg.data, cfg.stage.alignment
    problems = []
    prompts = stage.global_batch_size // max(a.group_size, 1)
    if generates and prompts % data_parallel_size:
        problems.append(f"stage={stage.name} gives each data-parallel replica whole groups: "
                        f"the {prompts} prompts of a step (global_batch_size / group_size) "
                        f"must divide among DP {data_parallel_size}")
    problems += reward_problems(a)
    if a.reward_weights.get("code") and (a.code_timeout <= 0 or a.code_memory_mb < 16):
        problems.append(f"the code reward runs each reply for code_timeout={a.code_timeout} s "
                        f"in code_memory_mb={a.code_memory_mb} MiB: give it above 0 s and at "
                        f"least 16 MiB")
    for key in ("reward_url", "reference_url", "critic_url"):
        url = getattr(a, key)
        if url and not url.startswith(("http://", "https://")):
            problems.append(f"stage.alignment.{key}={url} is not an http:// or https:// "
                            f"address")
    if a.reference_url and (a.reference_load or a.reference_tensor_model_parallel_size):
        problems.append("stage.alignment.reference_url serves the reference elsewhere: "
                        "unset reference_load and reference_tensor_model_parallel_size (the "
                        "server loads the reference)")
    if a.critic_url and a.critic_tensor_model_parallel_size:
        problems.append("stage.alignment.critic_url serves the critic elsewhere, with the "
                        "server's own layout: unset critic_tensor_model_parallel_size")
    if ("remote" in weights(a) or a.reference_url or a.critic_url) and a.server_timeout <= 0:
        problems.append(f"stage.alignment.server_timeout={a.server_timeout} must be above 0 "
                        f"(seconds)")
    if a.group_size < 1 or stage.global_batch_size % a.group_size:
        problems.append(f"stage.global_batch_size={stage.global_batch_size} (replies per "
                        f"step) must be a multiple of stage.alignment.group_size="
                        f"{a.group_size} (replies per prompt)")
    if a.max_new_tokens < 1 or a.max_new_tokens >= data.seq_length:
        problems.append(f"stage.alignment.max_new_tokens={a.max_new_tokens} must lie in "
                        f"1..{data.seq_length - 1} (below data.seq_length, which also "
                        f"holds the prompt)")
    if a.ppo_epochs < 1:
        problems.append(f"stage.alignment.ppo_epochs={a.ppo_epochs} must be at least 1")
    return problems + policy_gradient_problems(cfg)


def reward_problems(a) -> list[str]:
    """The reward's source and every key of reward_weights (a rule, or the score of a reward
    model or server that reward=combined adds to the rules)."""
    problems = _not_one_of("reward", a.reward, SOURCES)
    unknown = sorted(set(a.reward_weights) - set(RULES) - set(SCORES))
    if unknown:
        problems.append(f"stage.alignment.reward_weights names {', '.join(unknown)}, which is "
                        f"no reward rule or score; the rules are: {', '.join(RULES)}; the "
                        f"scores (with reward=combined): {', '.join(SCORES)}")
    scores = [key for key in SCORES if a.reward_weights.get(key)]
    if a.reward != "combined" and scores:
        problems.append(f"stage.alignment.reward_weights.{scores[0]} weighs a score in the sum "
                        f"with the rules that reward=combined makes, not reward={a.reward}: set "
                        f"stage.alignment.reward=combined, or drop reward_weights.{scores[0]}")
    if a.reward == "combined" and not scores:
        problems.append("stage.alignment.reward=combined adds a reward model's score "
                        "(reward_weights.model, with reward_load) or a server's "
                        "(reward_weights.remote, with reward_url) to the rules: weigh one of "
                        "them, or use reward=rule")
    used, combined = weights(a), a.reward == "combined"
    if "model" in used and not a.reward_load:
        problems.append(f"stage.alignment.reward={a.reward}"
                        f"{' with reward_weights.model' if combined else ''} needs "
                        f"stage.alignment.reward_load: a checkpoint written by stage=rm")
    if "remote" in used and not a.reward_url:
        problems.append(f"stage.alignment.reward={a.reward}"
                        f"{' with reward_weights.remote' if combined else ''} needs "
                        f"stage.alignment.reward_url: the http:// or https:// address of a "
                        f"reward server (docs/rlhf.md)")
    return problems


def policy_gradient_problems(cfg: Config) -> list[str]:
    stage, a = cfg.stage, cfg.stage.alignment
    problems = (_not_one_of("advantage_estimator", a.advantage_estimator, ESTIMATORS)
                + _not_one_of("policy_loss", a.policy_loss, POLICY_LOSSES)
                + _not_one_of("loss_agg_mode", a.loss_agg_mode, LOSS_AGGREGATIONS)
                + _not_one_of("kl_estimator", a.kl_estimator, KL_ESTIMATORS))
    estimator = ESTIMATORS.get(a.advantage_estimator)
    critic = "critic" in task_spec(stage.name).possible_roles
    if estimator and estimator.needs_values != critic:
        fitting = [name for name, e in ESTIMATORS.items() if e.needs_values == critic]
        problems.append(f"stage={stage.name} {'has a' if critic else 'has no'} critic: "
                        f"stage.alignment.advantage_estimator={a.advantage_estimator} does not "
                        f"fit it; use {either(fitting)}")
    if estimator and estimator.needs_groups and a.group_size < 2:
        problems.append(f"stage.alignment.advantage_estimator={a.advantage_estimator} compares "
                        f"replies within a group: stage.alignment.group_size must be at least 2")
    for key in ("clip_ratio_low", "clip_ratio_high"):
        value = getattr(a, key)
        if value is not None and value <= 0:
            problems.append(f"stage.alignment.{key}={value} must be above 0 (or null: "
                            f"clip_range)")
    if a.filter_groups and (a.group_size < 2 or a.max_sampling_rounds < 1):
        problems.append("stage.alignment.filter_groups drops groups whose replies all score the "
                        "same: it needs group_size >= 2 and max_sampling_rounds >= 1")
    if a.overlong_buffer_len < 0 or a.overlong_buffer_len > a.max_new_tokens:
        problems.append(f"stage.alignment.overlong_buffer_len={a.overlong_buffer_len} must lie "
                        f"in 0..max_new_tokens ({a.max_new_tokens})")
    return problems
