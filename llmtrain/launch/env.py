"""launcher=env and launcher=dlc: the platform starts one process per node (PAI-DLC, Kubernetes
PyTorchJob, a script run on each node) and says in the environment where the node stands.

conf/launcher/env.yaml reads MASTER_ADDR, MASTER_PORT, WORLD_SIZE (nodes) and RANK (node rank)
into the launcher config, so the plan printed before the run is already the multi-node one;
this module only refuses to start a node whose platform did not set them.
"""

from __future__ import annotations

import os

from llmtrain.config.schema import Config
from llmtrain.config.validate import ConfigError

VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def check(cfg: Config) -> None:
    """Every platform variable is set and the node's rank is one of the nodes."""
    name = cfg.launcher.name
    missing = [v for v in VARIABLES if not os.environ.get(v)]
    problems = []
    if missing:
        problems.append(
            f"launcher={name} takes the node's place from the environment, but "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: run it where "
            f"the platform sets them (MASTER_ADDR/MASTER_PORT: node 0's address and port, "
            f"WORLD_SIZE: the number of nodes, RANK: this node's rank), set them yourself on "
            f"each node, or use launcher=local on one machine")
    elif not 0 <= cfg.launcher.node_rank < cfg.launcher.nnodes:
        problems.append(f"this node's rank (RANK={cfg.launcher.node_rank}) must be between 0 and "
                        f"the number of nodes - 1 (WORLD_SIZE={cfg.launcher.nnodes})")
    if problems:
        raise ConfigError(problems)
