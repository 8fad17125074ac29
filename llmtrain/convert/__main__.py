"""`python -m llmtrain.convert`: checkpoint conversion between Hugging Face and Megatron-Core."""

from llmtrain.convert.cli import main

if __name__ == "__main__":
    main()
