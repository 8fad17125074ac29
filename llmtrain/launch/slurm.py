"""launcher=slurm: submission through submitit, and each node's share inside the job.

The job has one task per node (srun); each task starts its node's workers with
`local.launch`, on the rendezvous of the job's first node. Outside a job step,
`python -m llmtrain launcher=slurm ...` submits such a job; inside one (our submission,
hydra/launcher=submitit_slurm, or launchers/slurm.sbatch) the same command runs the node.

Preemption: sbatch's `--signal=USR1@<signal_delay_s>` warns every process of the job before
the time limit; the workers save and stop, and node 0 requeues the job (`scontrol requeue`),
which then starts again and resumes from its latest checkpoint (see llmtrain.launch).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from llmtrain.config.layout import Machine
from llmtrain.config.schema import Config
from llmtrain.config.validate import ConfigError, validate
from llmtrain.launch import PREEMPTION_SIGNAL, PREEMPTION_SIGNAL_NAME, local

# Slurm's --time formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds.
_TIME = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


def time_minutes(value: str) -> int:
    """A Slurm time limit in whole minutes (rounded up); ValueError if Slurm would refuse it."""
    match = _TIME.match(str(value).strip())
    if not match:
        raise ValueError(value)
    days, d_hours, d_minutes, d_seconds, a, b, c = (int(g) if g else 0 for g in match.groups())
    if match.group(1) is not None:
        seconds = ((days * 24 + d_hours) * 60 + d_minutes) * 60 + d_seconds
    elif match.group(7) is not None:  # hours:minutes:seconds
        seconds = (a * 60 + b) * 60 + c
    else:  # minutes[:seconds]
        seconds = a * 60 + b
    return math.ceil(seconds / 60)


def inside_job() -> bool:
    """True in a task started by srun: the node's share of a job, not a submission."""
    return "SLURM_JOB_ID" in os.environ and "SLURM_STEP_ID" in os.environ


def check(cfg: Config) -> None:
    """Every problem that stops a submission here, or this node's share of the job."""
    slurm = cfg.launcher.slurm
    problems = []
    try:
        time_minutes(slurm.time)
    except ValueError:
        problems.append(f"launcher.slurm.time={slurm.time} is not a Slurm time limit: write "
                        f"minutes (90), HH:MM:SS (04:00:00) or D-HH:MM:SS (2-00:00:00)")
    if slurm.gpus_per_node < 0:
        problems.append(f"launcher.slurm.gpus_per_node={slurm.gpus_per_node} must be 0 or more")
    if inside_job():
        tasks, nodes = os.environ.get("SLURM_NTASKS"), os.environ.get("SLURM_NNODES")
        if tasks != nodes:
            problems.append(f"this Slurm job step has {tasks} tasks on {nodes} node(s), but "
                            f"launcher=slurm starts each node's workers itself: run one task "
                            f"per node (srun --ntasks-per-node=1; with "
                            f"hydra/launcher=submitit_slurm, hydra.launcher.tasks_per_node=1)")
        elif nodes is not None and int(nodes) != cfg.launcher.nnodes:
            problems.append(f"launcher.nnodes={cfg.launcher.nnodes} but this Slurm job has "
                            f"{nodes} node(s): leave launcher.nnodes unset inside a job (it "
                            f"follows the allocation)")
    elif shutil.which("sbatch") is None and not cfg.dry_run:
        problems.append("launcher=slurm submits with Slurm's sbatch, which is not on this "
                        "machine's PATH: run the command on the cluster's login node, or use "
                        "launcher=local")
    if problems:
        raise ConfigError(problems)


def requested_machine(cfg: Config) -> Machine:
    """The nodes the job asks for; each node validates again against itself before it starts."""
    gpus = cfg.launcher.slurm.gpus_per_node
    return Machine(gpus=gpus, has_transformer_engine=gpus > 0)


def sbatch_parameters(cfg: Config) -> dict:
    """submitit's SlurmExecutor parameters for the job (names of `submitit.SlurmExecutor`)."""
    slurm = cfg.launcher.slurm
    extra: dict = {"signal": f"{PREEMPTION_SIGNAL_NAME}@{slurm.signal_delay_s}",
                   "requeue" if slurm.requeue else "no-requeue": True}
    extra.update(slurm.sbatch)
    srun_args = []
    if slurm.container_image:
        srun_args += [f"--container-image={slurm.container_image}",
                      f"--container-workdir={os.getcwd()}"]
        if slurm.container_mounts:
            srun_args.append(f"--container-mounts={slurm.container_mounts}")
    parameters = dict(
        job_name=cfg.name, nodes=cfg.launcher.nnodes, ntasks_per_node=1,
        time=time_minutes(slurm.time), partition=slurm.partition, account=slurm.account,
        gpus_per_node=slurm.gpus_per_node or None, cpus_per_task=slurm.cpus_per_task,
        mem=f"{slurm.mem_gb}GB" if slurm.mem_gb else None, exclusive=slurm.exclusive or None,
        signal_delay_s=slurm.signal_delay_s, srun_args=srun_args or None,
        # submitit's own handler (before and after the workers run) listens to our signal too.
        setup=[f"export SUBMITIT_PREEMPT_SIGNAL={PREEMPTION_SIGNAL_NAME}", *slurm.setup],
        additional_parameters=extra,
    )
    return {key: value for key, value in parameters.items() if value is not None}


class SlurmNode:
    """What each task of a submitted job runs. submitit calls `checkpoint` when the preemption
    signal comes while no worker runs: the same node is simply run again."""

    def __call__(self, cfg: Config) -> dict:
        return run_node(cfg)

    def checkpoint(self, cfg: Config):
        import submitit

        return submitit.helpers.DelayedSubmission(self, cfg)


def submit(cfg: Config) -> dict | None:
    """Submit the job; with launcher.slurm.wait, block until it ends and return its summary."""
    import submitit

    slurm = cfg.launcher.slurm
    out = Path(cfg.output_dir).resolve()
    cfg = replace(cfg, output_dir=str(out))  # the job may start in another folder
    python = slurm.python or ("python" if slurm.container_image else sys.executable)
    executor = submitit.SlurmExecutor(folder=out / "slurm", python=python)
    executor.update_parameters(**sbatch_parameters(cfg))
    job = executor.submit(SlurmNode(), cfg)
    print(f"[llmtrain] submitted Slurm job {job.job_id} ({cfg.launcher.nnodes} node(s)); "
          f"logs in {out / 'slurm'}/{job.job_id}_<node>_log.out, output in {out}; "
          f"follow it with `squeue -j {job.job_id}`, stop it with `scancel {job.job_id}`",
          flush=True)
    if not slurm.wait:
        return None
    return wait(job)


def queued(job_id: str) -> bool:
    """Pending, running or completing (also while requeued)."""
    listed = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format", "%T"],
                            capture_output=True, text=True)
    return listed.returncode == 0 and bool(listed.stdout.strip())


def wait(job) -> dict:
    """Block until every node has its result (through requeues); the logging node's summary."""
    while not job.done():
        if not queued(job.job_id) and not job.done():
            log = job.paths.stdout
            tail = log.read_text()[-3000:] if log.exists() else "(no log)"
            raise RuntimeError(f"Slurm job {job.job_id} left the queue without a result; "
                               f"the end of {log}:\n{tail}")
        time.sleep(2)
    return next((summary for summary in job.results() if summary), {})


def first_node_address() -> str:
    """Where the other nodes reach node 0: its NodeAddr, the address Slurm itself uses (the
    node's name unless the cluster configured another)."""
    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    shown = subprocess.run(["scontrol", "show", "node", nodes[0], "--oneliner"],
                           capture_output=True, text=True).stdout
    address = re.search(r"\bNodeAddr=(\S+)", shown)
    return address.group(1) if address else nodes[0]


def requeue(job_id: str) -> None:
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    print(f"[llmtrain] requeued Slurm job {job_id}: when it starts again it resumes from its "
          f"latest checkpoint", flush=True)


def run_node(cfg: Config) -> dict:
    """This node's share of the job: its workers, on the rendezvous of the job's first node."""
    from llmtrain.runtime import detect_machine

    check(cfg)
    job_id = os.environ["SLURM_JOB_ID"]
    node_rank = int(os.environ["SLURM_NODEID"])
    master = first_node_address()
    port = cfg.launcher.master_port or 20000 + int(job_id) % 20000
    cfg = replace(cfg, launcher=replace(cfg.launcher, node_rank=node_rank, master_addr=master,
                                        master_port=port))
    layout = validate(cfg, detect_machine())
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    print(f"[llmtrain] Slurm job {job_id} (restart {restarts}): node {node_rank} of "
          f"{cfg.launcher.nnodes} on {socket.gethostname()}, {layout.nproc_per_node} "
          f"{layout.device} worker(s), rendezvous {master}:{port}", flush=True)
    try:
        return local.launch(cfg, layout, node_rank=node_rank, spawn=True)
    except local.Requeue as stop:
        # The preemption notice (or a worker's own request) requeues the job. scancel's
        # SIGTERM is the user's decision: the workers save and stop, and the job stays cancelled.
        asked = not stop.signals or PREEMPTION_SIGNAL in stop.signals
        if asked and cfg.launcher.slurm.requeue and node_rank == 0:
            requeue(job_id)
        raise
