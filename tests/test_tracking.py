"""Experiment tracking against the real services: Weights & Biases in its offline mode (read back
with `wandb leet inspect`, W&B's own reader of a run's .wandb file) and an `mlflow server` with a
SQLite store on 127.0.0.1 (read back with MlflowClient); and a run whose trackers are down."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import FAST, run_llmtrain, summary

RUN = ["model=tiny", *FAST, "stage.train_iters=4", "stage.eval_interval=2", "stage.eval_iters=1",
       "checkpoint.save=null"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    store = tmp_path / "mlflow"
    store.mkdir()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri",
         f"sqlite:///{store}/mlflow.db", "--artifacts-destination", str(store / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no mlflow server"
                time.sleep(1)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # its workers too; the store is thrown away
        server.wait()


def console(stdout: str) -> dict[int, dict[str, float]]:
    """Step -> the loss and validation loss the console printed."""
    seen: dict[int, dict[str, float]] = {}
    for step, loss in re.findall(r"^step +(\d+)/\d+ \| loss ([\d.]+)", stdout, re.M):
        seen.setdefault(int(step), {})["train/loss"] = float(loss)
    for step, loss in re.findall(r"^step +(\d+) \| validation loss ([\d.]+)", stdout, re.M):
        seen.setdefault(int(step), {})["valid/loss"] = float(loss)
    return seen


def wandb_records(run_dir: Path) -> list[dict]:
    (offline_run,) = (run_dir / "wandb").glob("offline-run-*")  # one run: the logging rank's
    out = subprocess.run([str(Path(sys.executable).with_name("wandb")), "leet", "inspect",
                          "--json", str(offline_run)], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def test_wandb_offline_and_mlflow_hold_every_scalar_and_the_config(tmp_path, mlflow_server):
    from mlflow import MlflowClient

    run_dir = tmp_path / "run"
    process = run_llmtrain(*RUN, "parallel=tp1pp1", "launcher.nproc_per_node=2",
                           "logging.wandb_project=hub", f"logging.mlflow_tracking_uri={mlflow_server}",
                           "logging.mlflow_experiment=tiny-runs", "logging.mlflow_run_name=first",
                           f"hydra.run.dir={run_dir}", env={"WANDB_MODE": "offline"})
    printed = console(process.stdout)
    assert sorted(printed) == [1, 2, 3, 4] and "valid/loss" in printed[4]
    scalars = {key for key in summary(run_dir) if "/" in key}  # the last step's scalars
    assert {"train/loss", "train/lr", "throughput/tokens_per_s", "memory/peak_gib"} <= scalars

    # W&B: the resolved config, and each step's scalars as the console printed them.
    records = wandb_records(run_dir)
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["display_name"] == "pretrain_tiny" and run["project"] == "hub"
    config = run["config"]["update"]
    assert config["model"]["name"] == "tiny" and config["optim"]["lr"] == 1e-3
    assert config["data"]["seq_length"] == 64
    history: dict[int, dict] = {}
    for record in records:
        if record["type"] == "history":
            history.setdefault(record["history"]["step"]["num"], {}).update(
                record["history"]["item"])
    assert sorted(history) == [1, 2, 3, 4]
    for step, values in printed.items():
        assert scalars <= set(history[step]), (step, scalars - set(history[step]))
        for key, value in values.items():
            assert round(history[step][key], 4) == value, (step, key)

    # MLflow: one run (the logging rank's) with the config as parameters, every scalar and
    # the summary as an artifact.
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tiny-runs")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    assert mlflow_run.info.run_name == "first" and mlflow_run.info.status == "FINISHED"
    params = mlflow_run.data.params
    assert params["model.name"] == "tiny" and float(params["optim.lr"]) == 1e-3
    assert params["parallel.tensor_model_parallel_size"] == "1"
    for key in scalars | {"valid/loss", "valid/ppl"}:
        steps = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, key)}
        assert set(steps) == ({2, 4} if key.startswith("valid/") else {1, 2, 3, 4}), key
        for step, values in printed.items():
            if key in values:
                assert round(steps[step], 4) == values[key], (step, key)
    artifact = client.download_artifacts(mlflow_run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(Path(artifact).read_text())["losses"] == summary(run_dir)["losses"]


def test_training_goes_on_when_the_trackers_are_down(tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run_dir = tmp_path / "run"
    process = run_llmtrain(
        *RUN, "stage.train_iters=3", "logging.wandb_project=hub",
        f"logging.mlflow_tracking_uri={down}", f"hydra.run.dir={run_dir}",
        env={"WANDB_MODE": "online", "WANDB_BASE_URL": down, "WANDB_API_KEY": "x" * 40,
             "WANDB_INIT_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"})
    assert "warning: Weights & Biases failed to start" in process.stdout
    assert "warning: MLflow failed to start" in process.stdout
    assert summary(run_dir)["steps"] == 3 and len(summary(run_dir)["losses"]) == 3
