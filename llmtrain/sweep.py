"""Hydra callback: after a multirun, one table of every job's final loss and throughput."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def collect(sweep_dir: Path) -> list[dict]:
    """One row per job folder (hidden ones, such as submitit's .submitit/, are not jobs)."""
    rows = []
    for job in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0] != "."):
        summary_file = job / "summary.json"
        overrides_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        row = {"job": job.name, "overrides": overrides, "status": "failed"}
        if summary_file.exists():
            summary = json.loads(summary_file.read_text())
            row.update(status="done", final_loss=summary.get("final_loss"),
                       tokens_per_s=summary.get("throughput/tokens_per_s"))
        rows.append(row)
    # What the sweep varies: the overrides not shared by every job.
    shared = set.intersection(*(set(r["overrides"]) for r in rows)) if rows else set()
    for row in rows:
        row["sweep"] = " ".join(o for o in row["overrides"] if o not in shared)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'job':<6} {'status':<7} {'final loss':>10} {'tokens/s':>10}  sweep"]
    for row in rows:
        loss = f"{row['final_loss']:.4f}" if row.get("final_loss") is not None else "-"
        speed = f"{row['tokens_per_s']:,.0f}" if row.get("tokens_per_s") else "-"
        lines.append(f"{row['job']:<6} {row['status']:<7} {loss:>10} {speed:>10}  {row['sweep']}")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Writes `<sweep dir>/sweep_summary.json` and prints the table when a multirun ends.

    It reads the jobs' own summary.json files, so it works the same for local jobs and for
    jobs that ran elsewhere (Slurm) and wrote into the shared sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        rows = collect(sweep_dir)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(rows, indent=1))
        print(f"[llmtrain] sweep summary ({sweep_dir / 'sweep_summary.json'}):\n"
              f"{format_table(rows)}", flush=True)
