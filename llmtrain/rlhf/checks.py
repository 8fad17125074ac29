"""What validation checks of the alignment stages and their data (pure Python, like
llmtrain.config.validate, which calls this)."""

from __future__ import annotations

from llmtrain.config.schema import Config
from llmtrain.rlhf.losses import LOSS_TYPES
from llmtrain.rlhf.records import STAGE_DATA


def alignment_problems(cfg: Config, data_parallel_size: int, generates: bool = True
                       ) -> list[str]:
    """`generates`: whether the processes generate rollouts (a critic server's do not)."""
    stage, data, a = cfg.stage, cfg.data, cfg.stage.alignment
    problems = []
    wanted = STAGE_DATA.get(stage.name)
    if data.kind in STAGE_DATA.values() and wanted != data.kind:
        users = "rm or dpo" if data.kind == "preference" else "grpo or ppo"
        problems.append(f"data.kind={data.kind} is read by stage={users}, not stage={stage.name}")
    if wanted is None:
        return problems
    if data.kind != wanted:
        problems.append(f"stage={stage.name} reads {wanted} data: use data={wanted} (not "
                        f"data.kind={data.kind})")
    if data.kind == wanted and not data.data_path:
        problems.append(f"data={wanted} needs data.data_path: json/jsonl/parquet files (see "
                        f"docs/rlhf.md) or arithmetic")
    if stage.eval_interval:
        problems.append(f"stage={stage.name} has no evaluation pass yet: set stage.eval_interval=0")
    if stage.epochs is not None:
        problems.append(f"stage={stage.name} runs stage.train_iters steps: set stage.epochs=null")
    if cfg.parallel.virtual_pipeline_model_parallel_size:
        problems.append(f"stage={stage.name} runs without virtual pipeline stages: unset "
                        f"parallel.virtual_pipeline_model_parallel_size")
    if a.reference_url and stage.name not in ("grpo", "ppo"):
        problems.append(f"stage.alignment.reference_url applies to stage=grpo or ppo, not "
                        f"stage={stage.name}: unset it")
    if a.critic_url and stage.name != "ppo":
        problems.append(f"stage.alignment.critic_url applies to stage=ppo, not "
                        f"stage={stage.name}: unset it")
    if stage.name == "dpo":
        if a.loss_type not in LOSS_TYPES:
            problems.append(f"stage.alignment.loss_type={a.loss_type} is not one of: "
                            f"{', '.join(LOSS_TYPES)}")
        if a.beta <= 0:
            problems.append(f"stage.alignment.beta={a.beta} must be above 0")
        if a.reference_logprobs not in ("on_the_fly", "precomputed"):
            problems.append(f"stage.alignment.reference_logprobs={a.reference_logprobs} is not "
                            f"one of: on_the_fly, precomputed")
    if stage.name in ("grpo", "ppo"):
        prompts = stage.global_batch_size // max(a.group_size, 1)
        if generates and prompts % data_parallel_size:
            problems.append(f"stage={stage.name} gives each data-parallel replica whole groups: "
                            f"the {prompts} prompts of a step (global_batch_size / group_size) "
                            f"must divide among DP {data_parallel_size}")
        if a.reward not in ("rule", "model", "remote"):
            problems.append(f"stage.alignment.reward={a.reward} is not one of: rule, model, "
                            f"remote")
        if a.reward == "remote" and not a.reward_url:
            problems.append("stage.alignment.reward=remote needs stage.alignment.reward_url: the "
                            "http:// or https:// address of a reward server (docs/rlhf.md)")
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
        if (a.reward == "remote" or a.reference_url or a.critic_url) and a.server_timeout <= 0:
            problems.append(f"stage.alignment.server_timeout={a.server_timeout} must be above 0 "
                            f"(seconds)")
        if a.reward == "model" and not a.reward_load:
            problems.append("stage.alignment.reward=model needs stage.alignment.reward_load: a "
                            "checkpoint written by stage=rm")
        if a.group_size < 1 or stage.global_batch_size % a.group_size:
            problems.append(f"stage.global_batch_size={stage.global_batch_size} (replies per "
                            f"step) must be a multiple of stage.alignment.group_size="
                            f"{a.group_size} (replies per prompt)")
        if stage.name == "grpo" and a.group_size < 2:
            problems.append("stage=grpo compares replies within a group: "
                            "stage.alignment.group_size must be at least 2")
        if a.max_new_tokens < 1 or a.max_new_tokens >= data.seq_length:
            problems.append(f"stage.alignment.max_new_tokens={a.max_new_tokens} must lie in "
                            f"1..{data.seq_length - 1} (below data.seq_length, which also "
                            f"holds the prompt)")
        if a.ppo_epochs < 1:
            problems.append(f"stage.alignment.ppo_epochs={a.ppo_epochs} must be at least 1")
    return problems
