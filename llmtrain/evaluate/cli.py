"""`python -m llmtrain.evaluate`: Hydra composes conf/evaluate.yaml, then evaluate."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llmtrain.cli import CONF_DIR, resolve
from llmtrain.config.validate import ConfigError
from llmtrain.evaluate.config import register
from llmtrain.generate.plan import InferenceError

register()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="evaluate")
def main(dcfg: DictConfig) -> None:
    from llmtrain.runtime import quiet_libraries

    quiet_libraries()
    from llmtrain.evaluate.run import execute

    try:
        execute(resolve(dcfg))
    except (InferenceError, ConfigError) as error:
        print(f"llmtrain.evaluate: {error}", file=sys.stderr)
        sys.exit(2)
