"""Tiny pretraining runs as a user starts them: the loss falls, checkpoints resume exactly."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import FAST, run_llmtrain, summary


def test_tiny_pretraining_learns_and_checkpoints(tmp_path):
    out = run_llmtrain(*FAST, "stage.train_iters=50", "checkpoint.save_interval=25",
                       f"hydra.run.dir={tmp_path}").stdout
    result = summary(tmp_path)
    losses = result["losses"]
    assert len(losses) == 50
    # Random init starts near ln(4096) = 8.3; fifty steps on real text must get well below.
    assert losses[0] > 8.0
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5
    for step in (25, 50):
        assert (tmp_path / "checkpoints" / f"iter_{step:07d}" / "metadata.json").exists()
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "50"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert f"checkpoints in {tmp_path / 'checkpoints'}" in out


def test_resume_continues_exactly(tmp_path):
    """A run that died after its step-10 checkpoint, started again, gives the same losses."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [*FAST, "stage.train_iters=20", "checkpoint.save_interval=10"]
    run_llmtrain(*args, f"hydra.run.dir={full}")
    # The crashed run's folder: its step-10 checkpoint only.
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "iter_0000010", resumed / "checkpoints" / "iter_0000010")
    (resumed / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("10")

    out = run_llmtrain(*args, f"hydra.run.dir={resumed}").stdout
    assert "resuming after step 10" in out
    second = summary(resumed)
    assert second["start_step"] == 10
    # Same weights, optimizer moments, schedule and data position: bitwise equal on CPU.
    assert second["losses"] == summary(full)["losses"][10:]


def test_same_command_again_resumes_from_the_latest_checkpoint(tmp_path):
    args = [*FAST, "checkpoint.save_interval=5", f"hydra.run.dir={tmp_path}"]
    run_llmtrain(*args, "stage.train_iters=5")
    out = run_llmtrain(*args, "stage.train_iters=8", "optim.lr_decay_iters=8").stdout
    assert "resuming after step 5" in out
    assert summary(tmp_path)["start_step"] == 5
    assert len(summary(tmp_path)["losses"]) == 3
