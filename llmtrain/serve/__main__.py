"""`python -m llmtrain.serve`: an HTTP server for a Megatron-Core checkpoint."""

from llmtrain.serve.cli import main

if __name__ == "__main__":
    main()
