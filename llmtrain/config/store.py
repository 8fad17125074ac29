"""Registers the schema with Hydra's ConfigStore.

`conf/config.yaml` lists `schema` first in its defaults, so every group file is merged onto the
typed `Config`: unknown keys and wrong types are composition errors.
"""

from hydra.core.config_store import ConfigStore

from llmtrain.config.schema import Config


def register() -> None:
    ConfigStore.instance().store(name="schema", node=Config)
