"""`python -m llmtrain -m optim.lr=...` runs one job per value, each in its own folder."""

from __future__ import annotations

import json

from conftest import FAST, run_llmtrain


def test_multirun_sweeps_learning_rates(tmp_path):
    fixed = [arg for arg in FAST if not arg.startswith("optim.lr=")]
    out = run_llmtrain("-m", "optim.lr=1e-3,3e-3", *fixed, "stage.train_iters=4",
                       "checkpoint.save=null", f"hydra.sweep.dir={tmp_path}").stdout
    jobs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (tmp_path / job / "summary.json").exists()
        assert list((tmp_path / job / "tensorboard").glob("events.out.tfevents.*"))
    rows = json.loads((tmp_path / "sweep_summary.json").read_text())
    assert [r["sweep"] for r in rows] == ["optim.lr=0.001", "optim.lr=0.003"]
    assert all(r["status"] == "done" and r["final_loss"] > 0 for r in rows)
    assert "sweep summary" in out
    # Different learning rates, different runs.
    assert rows[0]["final_loss"] != rows[1]["final_loss"]
