"""`python -m llmtrain`: compose, validate, plan or launch a training run."""

from llmtrain.cli import run

if __name__ == "__main__":
    run()
