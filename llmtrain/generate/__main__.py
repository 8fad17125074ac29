"""`python -m llmtrain.generate`: offline generation from a Megatron-Core checkpoint."""

from llmtrain.generate.cli import main

if __name__ == "__main__":
    main()
