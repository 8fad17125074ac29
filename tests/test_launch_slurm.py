"""launcher=slurm against a real Slurm: slurmctld, slurmd and munged from Debian's packages
(slurm-wlm, munge), started on localhost from a slurm.conf written into a temporary folder.

Nothing is installed or configured system-wide and no daemon outlives the module: the fixture
cancels every job, stops the daemons it started and kills any process left with its SLURM_CONF.
The cluster has two nodes, two slurmd on this machine (each with its own port and spool),
so that multi-node jobs rendezvous across Slurm nodes as on a real cluster.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import FAST, ROOT, run_llmtrain, summary

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel")
# The node's CPUs only; tiny jobs, no GPUs.
CPU_JOB = ["launcher=slurm", "launcher.slurm.gpus_per_node=0", "launcher.slurm.time=10"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=llmtrain{port}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={dir}/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool/%n
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd-%n.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MessageTimeout=30
KillWait=5
NodeName=node1 NodeHostname={host} NodeAddr=127.0.0.1 Port={port1} CPUs={cpus} RealMemory=1000
NodeName=node2 NodeHostname={host} NodeAddr=127.0.0.1 Port={port2} CPUs={cpus} RealMemory=1000
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """A two-node Slurm cluster on this machine, for the duration of a test module."""

    NODES = ("node1", "node2")

    def __init__(self, folder: Path):
        self.dir = folder
        self.conf = folder / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.daemons: list[subprocess.Popen] = []

    def start(self) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.dir / sub).mkdir(mode=0o700)
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge = self.dir / "munge"
        self._spawn(["munged", "--foreground", "--force", f"--socket={munge}/munge.socket",
                     f"--key-file={key}", f"--pid-file={munge}/munged.pid",
                     f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"])
        self._until(lambda: (munge / "munge.socket").exists(), "munged to open its socket")
        self.conf.write_text(SLURM_CONF.format(
            host=socket.gethostname().split(".")[0], port=free_port(), port1=free_port(),
            port2=free_port(), dir=self.dir, cpus=max(1, os.cpu_count() // 2)))
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)])
        for node in self.NODES:
            self._spawn(["slurmd", "-D", "-f", str(self.conf), "-N", node], name=f"slurmd-{node}")
        self._until(lambda: self.run("sinfo", "--noheader", "--Node", "--format=%T", check=False)
                    .stdout.split() == ["idle"] * len(self.NODES), "the nodes to be idle")

    def _spawn(self, command: list[str], name: str | None = None) -> None:
        log = open(self.dir / "log" / f"{name or command[0]}.out", "w")
        self.daemons.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             env={**os.environ, **self.env}))

    def _until(self, ready, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [d.args[0] for d in self.daemons if d.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                                 for p in sorted((self.dir / "log").glob("*")))
                raise RuntimeError(f"local Slurm: waited for {what}; "
                                   f"{'stopped: ' + ', '.join(dead) if dead else 'timed out'}"
                                   f"\n{logs}")
            time.sleep(0.2)

    def run(self, *command: str, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """A Slurm command run from the repository root (sbatch's job starts there)."""
        return subprocess.run(command, capture_output=True, text=True, check=check, cwd=ROOT,
                              env={**os.environ, **self.env, **(env or {})})

    def jobs(self) -> list[str]:
        return self.run("squeue", "--noheader", "--format=%i", check=False).stdout.split()

    def job_info(self, job_id: str) -> str:
        return self.run("scontrol", "show", "job", job_id).stdout

    def wait_done(self, job_id: str, timeout: float = 600) -> None:
        self._until(lambda: job_id not in self.jobs(), f"job {job_id} to end", timeout)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, and kill anything still carrying our SLURM_CONF."""
        if self.jobs():
            self.run("scancel", "--full", *self.jobs(), check=False)
            deadline = time.monotonic() + 30
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        for daemon in reversed(self.daemons):
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        for process in psutil.process_iter():
            try:
                if (process.pid != os.getpid()
                        and process.environ().get("SLURM_CONF") == str(self.conf)):
                    process.kill()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): "
                    f"apt-get install slurmctld slurmd slurm-client munge (.ci/run does)")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start jobs")
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()


def job_id_of(stdout: str) -> str:
    return re.search(r"submitted Slurm job (\d+)", stdout).group(1)


def test_two_node_slurm_job_trains_and_logs_each_node(cluster, tmp_path):
    out = run_llmtrain(*FAST, *CPU_JOB, "launcher.nnodes=2", "parallel=tp2pp1",
                       "stage.train_iters=3", "checkpoint.save=null", "launcher.slurm.wait=true",
                       f"hydra.run.dir={tmp_path}", env=cluster.env).stdout
    job = job_id_of(out)
    assert "submitted Slurm job" in out and "(2 node(s))" in out
    assert "[llmtrain] done" in out  # the submitting command waited for the job
    assert len(summary(tmp_path)["losses"]) == 3
    logs = [(tmp_path / "slurm" / f"{job}_{node}_log.out").read_text() for node in (0, 1)]
    for node, log in enumerate(logs):
        assert f"Slurm job {job} (restart 0): node {node} of 2" in log
        assert "1 cpu worker(s), rendezvous 127.0.0.1:" in log  # node 0's NodeAddr
    assert "step      3/3" in logs[0]  # the logging rank is global rank 0, on node 0
    sbatch = (tmp_path / "slurm" / f"{job}_submission.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=1", "--signal=USR1@90", "--requeue",
                 "--exclusive", "--time=10"):
        assert f"#SBATCH {line}" in sbatch


def test_preempted_job_requeues_itself_and_resumes(cluster, tmp_path):
    """SIGUSR1 (what Slurm sends signal_delay_s before the time limit): the job requeues itself
    and its second run resumes from the latest checkpoint instead of starting over."""
    steps = 12
    out = run_llmtrain(*FAST, *CPU_JOB, f"stage.train_iters={steps}",
                       "checkpoint.save_interval=2", f"hydra.run.dir={tmp_path}",
                       env=cluster.env).stdout
    job = job_id_of(out)
    latest = tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + 600
    while not latest.exists():
        assert job in cluster.jobs() and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    cluster.run("scancel", "--signal=USR1", job)
    cluster.wait_done(job)

    info = cluster.job_info(job)
    assert "JobState=COMPLETED" in info and "Restarts=1" in info
    log = (tmp_path / "slurm" / f"{job}_0_log.out").read_text()
    assert "SIGUSR1: preemption notice" in log
    assert f"requeued Slurm job {job}" in log or "DUE TO JOB REQUEUE" in log
    assert f"Slurm job {job} (restart 1)" in log
    resumed = summary(tmp_path)
    assert 2 <= resumed["start_step"] < steps and "resuming after step" in log
    assert len(resumed["losses"]) == steps - resumed["start_step"]


def test_cancelled_job_is_not_requeued(cluster, tmp_path):
    """scancel (SIGTERM to the job) is the user's decision: the job does not requeue itself."""
    out = run_llmtrain(*FAST, *CPU_JOB, "stage.train_iters=50", "checkpoint.save=null",
                       f"hydra.run.dir={tmp_path}", env=cluster.env).stdout
    job = job_id_of(out)
    log = tmp_path / "slurm" / f"{job}_0_log.out"
    deadline = time.monotonic() + 600
    while "step      1/50" not in (log.read_text() if log.exists() else ""):
        assert job in cluster.jobs() and time.monotonic() < deadline, (
            f"training never started; the job's log:\n{log.read_text() if log.exists() else ''}")
        time.sleep(0.2)
    cluster.run("scancel", job)
    cluster.wait_done(job)
    info = cluster.job_info(job)
    assert "JobState=CANCELLED" in info and "Restarts=0" in info
    assert "requeued Slurm job" not in log.read_text()


def test_sweep_through_hydra_submitit_slurm(cluster, tmp_path):
    fixed = [arg for arg in FAST if not arg.startswith("optim.lr=")]
    out = run_llmtrain("-m", "hydra/launcher=submitit_slurm", "launcher=slurm",
                       "hydra.launcher.timeout_min=10", "optim.lr=1e-3,3e-3", *fixed,
                       "stage.train_iters=3", "checkpoint.save=null",
                       f"hydra.sweep.dir={tmp_path}", env=cluster.env).stdout
    rows = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [r["sweep"] for r in rows] == ["optim.lr=0.001", "optim.lr=0.003"]
    assert all(r["status"] == "done" and r["final_loss"] > 0 for r in rows)
    assert rows[0]["final_loss"] != rows[1]["final_loss"]
    assert "sweep summary" in out
    logs = list((tmp_path / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2 and all("(restart 0): node 0 of 1" in p.read_text() for p in logs)


def test_sbatch_template_runs_the_same_entrypoint(cluster, tmp_path):
    """launchers/slurm.sbatch, its GPU request overridden: two nodes, one model (TP 2)."""
    submitted = cluster.run(
        "sbatch", "--parsable", "--gpus-per-node=0", "--time=10", f"--output={tmp_path}/%j.out",
        "launchers/slurm.sbatch", *FAST, "parallel=tp2pp1", "stage.train_iters=3",
        "checkpoint.save=null", f"hydra.run.dir={tmp_path}/run", env={"PYTHON": sys.executable})
    job = submitted.stdout.strip()
    cluster.wait_done(job)
    log = (tmp_path / f"{job}.out").read_text()
    assert "JobState=COMPLETED" in cluster.job_info(job), log[-3000:]
    for node in (0, 1):
        assert f"Slurm job {job} (restart 0): node {node} of 2" in log
    assert len(summary(tmp_path / "run")["losses"]) == 3
