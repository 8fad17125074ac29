"""Launchers: how the worker processes of a run are started (config group `launcher`).

- local: the workers of this machine (`llmtrain.launch.local`, torchrun's way).
- env, dlc: platforms that start one process per node and put the node's place in the
  environment: MASTER_ADDR, MASTER_PORT, WORLD_SIZE (nodes), RANK (node rank) (`.env`).
- slurm: submitted through submitit from a login node; inside the job, each node's task starts
  that node's workers (`.slurm`).

Whichever the launcher, each node ends in `local.launch`, which applies `launcher.env` (NCCL
settings and the like) and supervises the node's workers.

Preemption contract with the training loop (docs/launchers.md):
- Slurm sends PREEMPTION_SIGNAL (SIGUSR1) to every process of the job `signal_delay_s` before
  the time limit (`--signal=USR1@90`); a launcher process records it and keeps supervising.
- A worker that exits with REQUEUE_EXIT_CODE asks to be run again: it has saved what it must
  (or the latest checkpoint is recent enough) and the next run resumes from `checkpoint.save`.
- The node's launcher then exits with REQUEUE_EXIT_CODE too (also when the workers died after a
  preemption notice); under Slurm, node 0 first requeues the job (`scontrol requeue`), unless
  the notice was scancel's SIGTERM (the workers save, and the job stays cancelled).
"""

from __future__ import annotations

import os
import signal

from llmtrain.config.layout import Layout, Machine
from llmtrain.config.schema import Config
from llmtrain.config.validate import ConfigError
from llmtrain.errors import REQUEUE_EXIT_CODE  # noqa: F401 (the launchers' name for it)

PREEMPTION_SIGNAL = signal.SIGUSR1
# Its name as sbatch (--signal=USR1@90) and submitit spell it.
PREEMPTION_SIGNAL_NAME = PREEMPTION_SIGNAL.name.removeprefix("SIG")
LAUNCHERS = ("local", "env", "dlc", "slurm")

# submitit asks Slurm for SIGUSR2 unless told otherwise; this makes it ask for (and, inside the
# job, listen to) llmtrain's signal, for our submissions and for hydra/launcher=submitit_slurm.
os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", PREEMPTION_SIGNAL_NAME)


def target_machine(cfg: Config) -> Machine:
    """The machine to plan the layout for: the nodes a Slurm submission asks for, else this one.

    Raises ConfigError when the launcher cannot run here (a platform variable missing, no
    sbatch on this machine)."""
    from llmtrain.runtime import detect_machine

    name = cfg.launcher.name
    if name not in LAUNCHERS:
        raise ConfigError([f"launcher.name={name} is not one of: {', '.join(LAUNCHERS)}"])
    if name in ("env", "dlc"):
        from llmtrain.launch import env

        env.check(cfg)
    if name == "slurm":
        from llmtrain.launch import slurm

        slurm.check(cfg)
        if not slurm.inside_job():
            return slurm.requested_machine(cfg)
    return detect_machine()


def runs_here(cfg: Config) -> bool:
    """Whether this machine starts workers of the run (not a Slurm submission from a login
    node)."""
    if cfg.launcher.name != "slurm":
        return True
    from llmtrain.launch import slurm

    return slurm.inside_job()


def launch(cfg: Config, layout: Layout) -> dict | None:
    """Run the job: the logging rank's summary, or None when it was submitted to run elsewhere."""
    if cfg.launcher.name == "slurm":
        from llmtrain.launch import slurm

        return slurm.run_node(cfg) if slurm.inside_job() else slurm.submit(cfg)
    from llmtrain.launch import local

    return local.launch(cfg, layout, node_rank=cfg.launcher.node_rank)
