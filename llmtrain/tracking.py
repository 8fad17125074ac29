"""Experiment trackers the logging rank reports to: Weights & Biases and MLflow.

A tracker that fails (service down, bad credentials, network gone mid-run) prints one warning and
is dropped: the run goes on with the console, TensorBoard and summary.json.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional

from llmtrain.config.schema import Config

# MLflow keeps a parameter's value to this many characters (mlflow.utils.validation).
MLFLOW_PARAM_CHARS = 6000


def flat_config(cfg: Config) -> dict[str, str]:
    """The resolved config as dotted keys (`optim.lr`) and printable values."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = str(value)

    walk("", dataclasses.asdict(cfg))
    return flat


class WandbTracker:
    name = "Weights & Biases"

    def __init__(self, cfg: Config):
        import wandb

        self.run = wandb.init(project=cfg.logging.wandb_project,
                              name=cfg.logging.wandb_exp_name or cfg.name,
                              dir=cfg.output_dir, config=dataclasses.asdict(cfg))

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def finish(self, summary: Optional[Path]) -> None:
        self.run.finish()


class MlflowTracker:
    name = "MLflow"

    def __init__(self, cfg: Config):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        self.client = MlflowClient(tracking_uri=cfg.logging.mlflow_tracking_uri)
        name = cfg.logging.mlflow_experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = (experiment.experiment_id if experiment
                         else self.client.create_experiment(name))
        self.run_id = self.client.create_run(
            experiment_id, run_name=cfg.logging.mlflow_run_name or cfg.name).info.run_id
        params = [Param(key, value[:MLFLOW_PARAM_CHARS])
                  for key, value in flat_config(cfg).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[
            Metric(key, float(value), now, step) for key, value in scalars.items()])

    def finish(self, summary: Optional[Path]) -> None:
        if summary is not None and summary.exists():
            self.client.log_artifact(self.run_id, str(summary))
        self.client.set_terminated(self.run_id)


class Trackers:
    """The trackers `cfg.logging` names, each dropped with a warning at its first failure."""

    def __init__(self, cfg: Config, warn: Callable[[str], None]):
        self.warn = warn
        self.active = []
        wanted = [(WandbTracker, cfg.logging.wandb_project),
                  (MlflowTracker, cfg.logging.mlflow_tracking_uri)]
        for kind, enabled in wanted:
            if enabled:
                tracker = self._guarded(kind.name, "start", lambda kind=kind: kind(cfg))
                if tracker is not None:
                    self.active.append(tracker)

    def _guarded(self, name: str, action: str, call: Callable):
        try:
            return call()
        except Exception as error:  # any failure of the service: the run must not stop
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self.warn(f"warning: {name} failed to {action} ({type(error).__name__}: "
                      f"{first_line[:300]}); training goes on without it")
            return None

    def _each(self, action: str, call: Callable) -> None:
        for tracker in list(self.active):
            if self._guarded(tracker.name, action, lambda: call(tracker) or True) is None:
                self.active.remove(tracker)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self._each("log", lambda tracker: tracker.log(scalars, step))

    def finish(self, summary: Optional[Path]) -> None:
        self._each("finish", lambda tracker: tracker.finish(summary))
        self.active = []
