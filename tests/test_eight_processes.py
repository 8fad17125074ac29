"""The headline layouts of the 8-GPU run, on CPU: eight gloo processes and a tiny model give the
losses of one process (the GPU run itself needs an 8-GPU machine; see docs/performance.md).

Slow (eight Python processes on a laptop's cores): `make test-all` runs it, CI does not.
"""

from __future__ import annotations

import pytest

from conftest import FAST, run_llmtrain, summary

pytestmark = pytest.mark.slow
STEPS = ["stage.train_iters=3", "checkpoint.save=null", "stage.global_batch_size=16"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one")
    run_llmtrain(*FAST, *STEPS, f"hydra.run.dir={run_dir}")
    return summary(run_dir)["losses"]


@pytest.mark.parametrize("layout", [
    ["parallel=tp4pp2"],
    ["parallel=tp2pp1", "parallel.data_parallel_size=4"],
    ["parallel=tp2pp2", "parallel.data_parallel_size=2"],
], ids=lambda args: " ".join(args))
def test_eight_process_layout_matches_one_process(layout, reference, tmp_path):
    run_llmtrain(*FAST, *STEPS, *layout, f"hydra.run.dir={tmp_path}", timeout=1800)
    result = summary(tmp_path)
    assert result["world_size"] == 8
    assert result["losses"] == pytest.approx(reference, rel=1e-5)


def test_resume_from_tp4pp2_at_tp2pp2(reference, tmp_path):
    """The headline run's layout change: saved by eight processes at TP 4 x PP 2, resumed by
    eight at TP 2 x PP 2 x DP 2, with the losses of one process."""
    saved = tmp_path / "tp4pp2"
    run_llmtrain(*FAST, "stage.train_iters=3", "stage.global_batch_size=16",
                 "stage.exit_interval=2", "parallel=tp4pp2", f"hydra.run.dir={saved}", timeout=1800)
    out = run_llmtrain(*FAST, *STEPS, "parallel=tp2pp2", "parallel.data_parallel_size=2",
                       f"checkpoint.load={saved}/checkpoints", f"hydra.run.dir={tmp_path / 'b'}",
                       timeout=1800).stdout
    assert "resuming after step 2" in out
    assert summary(tmp_path / "b")["losses"] == pytest.approx(reference[2:], rel=1e-5)
