"""Launchers without a scheduler: two "nodes" on localhost with launcher=env, the environment
settings every launcher applies, a sweep through submitit's local executor, and the errors a
user sees when the platform is not there."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import FAST, ROOT, compose_config, run_llmtrain, summary
from llmtrain.config.layout import Machine
from llmtrain.config.validate import validate
from llmtrain.launch import local
from llmtrain.launch.slurm import time_minutes

STEPS = ["stage.train_iters=4", "checkpoint.save=null"]
PLATFORM = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_llmtrain(*args: str, env: dict) -> subprocess.Popen:
    """`python -m llmtrain args...` in the background, in its own process group."""
    return subprocess.Popen([sys.executable, "-m", "llmtrain", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_two_nodes_train_one_model_together(tmp_path):
    """RANK 0 and RANK 1 of WORLD_SIZE=2 nodes split one tensor-parallel model between them and
    train it to the losses of a single process."""
    port = str(free_port())
    run = [*FAST, *STEPS, "launcher=env", "parallel=tp2pp1", "+launcher.env.GLOO_SOCKET_IFNAME=lo",
           f"hydra.run.dir={tmp_path / 'nodes'}"]
    platform = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    node1 = start_llmtrain(*run, env={**platform, "RANK": "1"})
    try:
        node0 = run_llmtrain(*run, env={**platform, "RANK": "0"})
        node1_out, _ = node1.communicate(timeout=300)
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
            node1.wait()
    assert node1.returncode == 0, node1_out[-4000:]
    for out in (node0.stdout, node1_out):
        assert "processes    2 = 2 node(s) x 1  |  TP 2" in out
    # Only the logging rank (global rank 0, on node 0) reports the loss.
    assert "step      4/4" in node0.stdout and "step      4/4" not in node1_out

    run_llmtrain(*FAST, *STEPS, f"hydra.run.dir={tmp_path / 'one'}")
    together = summary(tmp_path / "nodes")["losses"]
    assert together == pytest.approx(summary(tmp_path / "one")["losses"], rel=1e-5)


def test_env_launcher_refuses_to_start_without_the_platform(monkeypatch):
    for name in PLATFORM:
        monkeypatch.delenv(name, raising=False)
    failed = run_llmtrain("launcher=dlc", check=False, env={"MASTER_ADDR": "10.0.0.1"})
    assert failed.returncode == 2
    assert "MASTER_PORT, WORLD_SIZE, RANK are not set" in failed.stderr
    outside = run_llmtrain("launcher=env", check=False, env={
        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "2"})
    assert outside.returncode == 2 and "RANK=2" in outside.stderr


def test_dlc_plans_from_the_platform_environment():
    out = run_llmtrain("launcher=dlc", "model=llama3_8b", "parallel=tp4pp2", "precision=bf16",
                       "device=cuda", "dry_run=true", "--cfg", "job", "--resolve",
                       "--package", "launcher", env={
                           "MASTER_ADDR": "dlc-master-0", "MASTER_PORT": "23456",
                           "WORLD_SIZE": "4", "RANK": "3",
                           "KUBERNETES_CONTAINER_RESOURCE_GPU": "8"}).stdout
    for line in ("nnodes: 4", "node_rank: 3", "nproc_per_node: 8", "master_addr: dlc-master-0",
                 "master_port: 23456", "NCCL_IB_GID_INDEX: '3'", "NCCL_IB_TC: '136'"):
        assert line in out


def test_launcher_env_reaches_the_workers(tmp_path):
    """launcher.env is set in every worker: a network interface that does not exist stops
    gloo from connecting, and the error names it."""
    failed = run_llmtrain(*FAST, *STEPS, "parallel=tp2pp1",
                          "+launcher.env.GLOO_SOCKET_IFNAME=llmtrain-none0",
                          f"hydra.run.dir={tmp_path}", check=False)
    assert failed.returncode != 0
    assert "Unable to find address for: llmtrain-none0" in failed.stdout + failed.stderr


@pytest.mark.parametrize("own", [None, "max_split_size_mb:64"])
def test_cuda_allocator_defaults_to_expandable_segments(monkeypatch, own):
    """Every tool sets the allocator's default before CUDA starts; a user's own setting wins."""
    from llmtrain.runtime import CUDA_ALLOC_CONF, detect_machine

    if own is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", own)
    detect_machine()
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == (own or CUDA_ALLOC_CONF)


def test_sweep_through_submitit_local_executor(tmp_path):
    fixed = [arg for arg in FAST if not arg.startswith("optim.lr=")]
    out = run_llmtrain("-m", "hydra/launcher=submitit_local", "optim.lr=1e-3,3e-3", *fixed,
                       *STEPS, f"hydra.sweep.dir={tmp_path}").stdout
    rows = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [r["sweep"] for r in rows] == ["optim.lr=0.001", "optim.lr=0.003"]
    assert all(r["status"] == "done" and r["final_loss"] > 0 for r in rows)
    assert "sweep summary" in out
    # Each job ran as its own submitit process, with its log next to the sweep.
    assert len(list((tmp_path / ".submitit").glob("*/*_log.out"))) == 2


def test_slurm_needs_sbatch_to_submit(tmp_path):
    failed = run_llmtrain("launcher=slurm", check=False, env={"PATH": str(tmp_path)})
    assert failed.returncode == 2
    assert "sbatch, which is not on this machine's PATH" in failed.stderr


def test_slurm_plans_for_the_nodes_it_asks_for(tmp_path):
    """A dry run plans the job for the requested GPU nodes, even from a laptop without Slurm."""
    out = run_llmtrain("launcher=slurm", "launcher.nnodes=2", "model=llama3_8b",
                       "parallel=tp4pp2", "precision=bf16", "dry_run=true",
                       env={"PATH": str(tmp_path)}).stdout
    assert "processes    16 = 2 node(s) x 8  |  TP 4  PP 2" in out
    assert "(pretrain, bf16, cuda)" in out


def test_dlc_example_submits_the_entrypoint_every_node_runs(tmp_path):
    """launchers/dlc_job.sh hands `pai dlc job submit` a node command; run as DLC runs it on
    each of two nodes, it plans the two-node job (dry run: no GPUs here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pai").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$PAI_ARGS"\n')
    (bin_dir / "pai").chmod(0o755)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PAI_ARGS": str(tmp_path / "args"), "IMAGE": "registry.example/llmtrain:latest",
           "NODES": "2", "CODE_DIR": str(ROOT),
           "OUTPUT": str(tmp_path / "run"), "PYTHONPATH": str(ROOT)}
    subprocess.run(["bash", str(ROOT / "launchers" / "dlc_job.sh"), "model=llama3_8b",
                    "parallel=tp4pp2", "precision=bf16", "device=cuda", "dry_run=true"],
                   env=env, check=True, capture_output=True)
    args = (tmp_path / "args").read_text().splitlines()
    assert args[:2] == ["dlc", "job"] and args[args.index("--worker-count") + 1] == "2"
    command = args[args.index("--command") + 1]
    for rank in ("0", "1"):
        node = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env={
            **env, "MASTER_ADDR": "dlc-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2",
            "RANK": rank, "KUBERNETES_CONTAINER_RESOURCE_GPU": "8"})
        assert node.returncode == 0, node.stderr[-3000:]
        assert "processes    16 = 2 node(s) x 8  |  TP 4  PP 2" in node.stdout


@pytest.mark.parametrize("limit,minutes", [("90", 90), ("1:30", 2), ("04:00:00", 240),
                                           ("0:30:01", 31), ("1-12", 2160), ("1-2:30", 1590),
                                           ("2-00:00:00", 2880)])
def test_slurm_time_limits_in_every_slurm_format(limit, minutes):
    assert time_minutes(limit) == minutes


def _killed_by_the_kernel(cfg, layout):
    """Rank 1 dies as the out-of-memory killer ends a process; rank 0, told to stop by torch
    elastic, exits as a worker asking for a requeue would."""
    if os.environ["RANK"] == "1":
        time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(local.REQUEUE_EXIT_CODE))
    time.sleep(60)


def test_a_worker_killed_by_the_kernel_is_a_failure_not_a_requeue(capsys):
    cfg = compose_config("parallel.data_parallel_size=2", "stage.global_batch_size=8")
    layout = validate(cfg, Machine())
    with pytest.raises(SystemExit) as stopped:
        local.launch(cfg, layout, entry=_killed_by_the_kernel)
    assert stopped.value.code == 1
    err = capsys.readouterr()
    assert ("llmtrain: worker rank 1 of 2 was killed by SIGKILL - most often the kernel's "
            "out-of-memory killer") in err.err, err
    assert "nothing was saved for it, and the run is not requeued" in err.err
    assert "requeued (exit status" not in err.out
