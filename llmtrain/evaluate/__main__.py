"""`python -m llmtrain.evaluate`: lm-evaluation-harness and perplexity."""

from llmtrain.evaluate.cli import main

if __name__ == "__main__":
    main()
