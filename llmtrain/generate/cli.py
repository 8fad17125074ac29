"""`python -m llmtrain.generate`: Hydra composes conf/generate.yaml, then plan, load, generate."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llmtrain.cli import CONF_DIR, resolve
from llmtrain.config.store import register as register_training
from llmtrain.config.validate import ConfigError
from llmtrain.generate.config import register
from llmtrain.generate.plan import InferenceError

register()
register_training()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="generate")
def main(dcfg: DictConfig) -> None:
    from llmtrain.runtime import quiet_libraries

    quiet_libraries()
    from llmtrain.generate.run import execute

    try:
        execute(resolve(dcfg))
    except (InferenceError, ConfigError) as error:
        print(f"llmtrain.generate: {error}", file=sys.stderr)
        sys.exit(2)
