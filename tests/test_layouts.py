"""The same tiny model and seed under TP, PP, TP x PP, DP, VPP and activation recomputation
gives the losses of one process.

Weights are drawn per parameter from its global name (llmtrain.megatron.init), so every layout
starts from the same model, and samples are assigned per global step, so every layout sees the
same batches. What can still differ is floating-point summation order: a TP split sums a
matrix product's halves separately, a DP split sums gradients across ranks. In fp32 that moves a
loss by about 1e-7 per step, growing with the updates; 1e-5 relative after six steps leaves room
for that and none for a real mismatch (a wrong shard or batch moves the loss by 1e-3 or more).
"""

from __future__ import annotations

import os
import re

import pytest

from conftest import FAST, run_llmtrain, summary

STEPS = ["stage.train_iters=6", "checkpoint.save=null"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tp1pp1")
    run_llmtrain(*FAST, *STEPS, f"hydra.run.dir={run_dir}")
    return summary(run_dir)["losses"]


@pytest.mark.parametrize("layout", [
    ["parallel=tp2pp1"],
    ["parallel=tp1pp2"],
    ["parallel=tp2pp2"],
    ["parallel=tp1pp1", "parallel.data_parallel_size=2"],
    ["parallel=tp1pp2", "parallel.virtual_pipeline_model_parallel_size=2"],
    ["parallel=tp1pp2", "parallel.num_layers_in_first_pipeline_stage=1"],  # 1 + 3 layers
    ["parallel.recompute_granularity=full", "parallel.recompute_method=uniform",
     "parallel.recompute_num_layers=1"],
], ids=lambda args: " ".join(args))
def test_layout_matches_one_process(layout, reference, tmp_path):
    out = run_llmtrain(*FAST, *STEPS, *layout, f"hydra.run.dir={tmp_path}").stdout
    processes, threads = map(int, re.search(r"on (\d+) cpu process\(es\) of (\d+) thread",
                                            out).groups())
    if processes > 1:  # the cores shared out: a thread per core each would oversubscribe them
        assert threads == max(1, len(os.sched_getaffinity(0)) // processes)
    if "parallel.virtual_pipeline_model_parallel_size=2" in layout:
        assert "pipeline schedule forward_backward_pipelining_with_interleaving" in out
    losses = summary(tmp_path)["losses"]
    assert len(losses) == len(reference) == 6
    assert losses == pytest.approx(reference, rel=1e-5)
    assert losses[-1] < losses[0]


def test_resume_under_another_layout_continues_the_run(reference, tmp_path):
    """A checkpoint saved at TP 2 resumes at PP 2: Megatron-Core reshards it on load, and the
    resumed steps give the losses the uninterrupted one-process run had."""
    saved = tmp_path / "tp2"
    run_llmtrain(*FAST, "stage.train_iters=6", "stage.exit_interval=3", "parallel=tp2pp1",
                 f"hydra.run.dir={saved}")
    out = run_llmtrain(*FAST, *STEPS, "parallel=tp1pp2", f"checkpoint.load={saved}/checkpoints",
                       f"hydra.run.dir={tmp_path / 'pp2'}").stdout
    assert "resuming after step 3" in out
    assert summary(tmp_path / "pp2")["losses"] == pytest.approx(reference[3:], rel=1e-5)
