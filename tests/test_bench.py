"""`python -m llmtrain.bench`: the llmtrain run it launches itself, on the CPU with the tiny model."""

from conftest import FAST

from llmtrain.bench.__main__ import llmtrain_step_times

# The user's overrides as the benchmark gets them: the optimizer group's warm-up (10 iterations)
# is longer than the benchmark's whole run of 3 + 5 steps.
USER = ["model=tiny", *[o for o in FAST if not o.startswith("optim.lr_warmup_iters")]]


def test_benchmark_sizes_the_schedule_of_its_own_short_run():
    result = llmtrain_step_times(USER, steps=5, warmup=3)
    assert len(result["step_seconds"]) == 5
    assert all(seconds > 0 for seconds in result["step_seconds"])
    assert result["peak_memory_gib"] > 0
