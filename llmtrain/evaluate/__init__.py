"""Evaluation of llmtrain models (docs/evaluate.md): lm-evaluation-harness tasks against the
served model or an exported Hugging Face model, and perplexity on held-out indexed datasets.

`python -m llmtrain.evaluate ...`, or from Python `evaluate("load=...", "tasks=[...]")`.
"""

from __future__ import annotations


def evaluate(*overrides: str, say=print) -> dict:
    """Run `python -m llmtrain.evaluate <overrides>` in this process; return its report."""
    from llmtrain.evaluate.config import register
    from llmtrain.evaluate.run import execute
    from llmtrain.generate.config import compose

    return execute(compose("evaluate", register, list(overrides)), say)
