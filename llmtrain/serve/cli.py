"""`python -m llmtrain.serve`: Hydra composes conf/serve.yaml, then plan, load, serve."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llmtrain.cli import CONF_DIR, resolve
from llmtrain.config.store import register as register_training
from llmtrain.config.validate import ConfigError
from llmtrain.generate.plan import InferenceError
from llmtrain.serve.config import register

register()
register_training()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="serve")
def main(dcfg: DictConfig) -> None:
    from llmtrain.runtime import quiet_libraries

    quiet_libraries()
    from llmtrain.serve.run import execute

    try:
        execute(resolve(dcfg))
    except (InferenceError, ConfigError) as error:
        print(f"llmtrain.serve: {error}", file=sys.stderr)
        sys.exit(2)
