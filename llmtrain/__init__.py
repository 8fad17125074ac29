"""llmtrain: Hydra-configured training of GPT-style language models on Megatron-Core."""

__version__ = "0.1.0"
