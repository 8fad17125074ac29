"""Alignment stages on Megatron-Core: stage=rm (reward model), dpo, kto, grpo and ppo, the
tasks (llmtrain.megatron.tasks.Task) that the stage registry (llmtrain.tasks,
llmtrain.rlhf.stages) names. Pure parts (records, rewards, advantages, losses) live in
llmtrain.rlhf."""
