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
