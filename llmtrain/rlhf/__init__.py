"""Alignment stages' pure parts (no Megatron): preference and prompt records through the chat
templates, rule-based rewards, advantages and the alignment losses. The Megatron side (reward
and value heads, roles, rollouts) is llmtrain.megatron.align."""
