"""Checkpoint conversion between Hugging Face and Megatron-Core, verified layer by layer.

`python -m llmtrain.convert ...` (docs/convert.md), or from Python `convert("input=...", ...)`
with the same overrides.
"""

from __future__ import annotations


def convert(*overrides: str, say=print) -> dict:
    """Run the conversion `python -m llmtrain.convert <overrides>` describes, in this process;
    return its report. Raises ConversionError (bad input) or CheckFailed (outputs differ)."""
    from hydra import compose, initialize_config_dir

    from llmtrain.cli import CONF_DIR, resolve
    from llmtrain.config.store import register as register_training
    from llmtrain.convert.config import register
    from llmtrain.convert.plan import prepare
    from llmtrain.convert.run import execute

    register()
    register_training()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        config = resolve(compose("convert", overrides=list(overrides)))
    return execute(prepare(config), say)
