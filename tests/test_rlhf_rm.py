"""stage=rm: a reward head on the GPT backbone learns to rank separable preference pairs, logs
accuracy and margin to TensorBoard, and resumes from its checkpoints like training."""

from __future__ import annotations

from conftest import run_llmtrain, summary
from rlhf_helpers import TINY, separable_pairs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def test_reward_model_separates_pairs_and_resumes(tmp_path):
    data = separable_pairs(tmp_path / "pairs.jsonl")
    run = tmp_path / "rm"
    args = ["stage=rm", "data=preference", f"data.data_path=[{data}]", *TINY,
            "stage.micro_batch_size=4", "stage.global_batch_size=8", f"hydra.run.dir={run}",
            "checkpoint.save_interval=10"]
    out = run_llmtrain(*args, "stage.train_iters=20").stdout
    assert "preference data: 200 pairs, 196 for training" in out
    first = summary(run)
    accuracy, margin = first["metrics"]["accuracy"], first["metrics"]["margin"]
    assert sum(accuracy[-5:]) / 5 >= 0.95, accuracy
    assert sum(margin[-5:]) / 5 > 1.0 > margin[0], margin
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert {"train/accuracy", "train/margin", "train/loss"} <= set(events.Tags()["scalars"])

    # The same command with more steps resumes after step 20 and keeps ranking the pairs.
    out = run_llmtrain(*args, "stage.train_iters=24").stdout
    assert "resuming after step 20" in out
    resumed = summary(run)
    assert resumed["start_step"] == 20 and len(resumed["metrics"]["accuracy"]) == 4
    assert min(resumed["metrics"]["accuracy"]) >= 0.9
