"""Offline generation from Megatron-Core checkpoints (docs/generate_serve.md).

`python -m llmtrain.generate load=... input=... output=...`, or from Python
`generate("load=...", "input=...", "output=...")` with the same overrides.
"""

from __future__ import annotations


def generate(*overrides: str, say=print) -> dict:
    """Run `python -m llmtrain.generate <overrides>` in this process (several processes for
    TP x PP > 1); return its summary. Raises InferenceError or ConfigError on bad input."""
    from llmtrain.generate.config import compose, register
    from llmtrain.generate.run import execute

    return execute(compose("generate", register, list(overrides)), say)
