"""Benchmarks: llmtrain's training step beside a bare Megatron-Core step and a transformers step."""
