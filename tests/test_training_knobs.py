"""Each training knob does what it claims, checked on tiny CPU runs."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from conftest import FAST, ROOT, compose_config, run_llmtrain, summary
from llmtrain.cli import resolve_run
from llmtrain.config.schedule import resolve_token_lengths
from llmtrain.profiling import gpu_summary

NO_SAVE = ["checkpoint.save=null"]


def saved_activation_bytes(*overrides: str) -> int:
    process = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "activation_memory.py"), "data.seq_length=128",
         "stage.micro_batch_size=2", *overrides],
        capture_output=True, text=True, cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT)})
    return json.loads(process.stdout.strip().splitlines()[-1])["saved_bytes"]


def test_recompute_lowers_the_activations_kept_for_backward():
    plain = saved_activation_bytes()
    selective = saved_activation_bytes("parallel.recompute_granularity=selective")
    full = saved_activation_bytes("parallel.recompute_granularity=full",
                                  "parallel.recompute_method=uniform",
                                  "parallel.recompute_num_layers=1")
    # Selective recomputes the attention core; full keeps only each layer's input.
    assert full < selective < plain
    assert full < plain / 3


def test_wsd_schedule_has_warmup_stable_and_decay(tmp_path):
    run_llmtrain(*FAST, *NO_SAVE, "stage.train_iters=12", "optim.lr=1e-3", "optim.min_lr=1e-4",
                 "optim.lr_warmup_iters=2", "optim.lr_decay_style=WSD",
                 "optim.lr_wsd_decay_iters=4", f"hydra.run.dir={tmp_path}")
    lrs = summary(tmp_path)["lrs"]
    # Step k uses the rate of scheduler step k-1: warm-up over steps 0..2, stable up to step 8,
    # then linear decay that would reach min_lr at step 12 (one past the run's last step).
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert lrs[3:9] == pytest.approx([1e-3] * 6)
    assert lrs[9:] == pytest.approx([1e-3 - 0.9e-3 * k / 4 for k in (1, 2, 3)])


def test_token_counts_set_the_iterations():
    cfg = resolve_run(compose_config("data.seq_length=128", "stage.global_batch_size=8",
                                 "stage.train_tokens=102400", "optim.lr_warmup_tokens=10240",
                                 typed=False))
    # 1024 tokens per step.
    assert (cfg.stage.train_iters, cfg.optim.lr_warmup_iters) == (100, 10)
    assert resolve_token_lengths(cfg) == cfg


def test_fp16_loss_scaling_recovers_from_overflow(tmp_path):
    """A loss scale of 2^16 overflows these fp16 gradients: the step is skipped and the scale
    halves until the gradients fit, then the weights update again."""
    out = run_llmtrain("data.seq_length=32", "stage.micro_batch_size=1",
                       "stage.global_batch_size=1", "stage.eval_interval=0", *NO_SAVE,
                       "precision=fp16", "precision.initial_loss_scale=65536",
                       "precision.hysteresis=1", "optim.lr=1e-3", "optim.lr_warmup_iters=0",
                       "optim.lr_decay_style=constant", "stage.train_iters=10",
                       f"hydra.run.dir={tmp_path}").stdout
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    skipped = [line.endswith("| skipped") for line in steps]
    scales = [int(line.split("loss scale ")[1].split()[0]) for line in steps]
    assert skipped[0], "the first step must overflow at a scale of 2^16"
    for index, was_skipped in enumerate(skipped):
        before = 65536 if index == 0 else scales[index - 1]
        if was_skipped:
            assert scales[index] == before // 2
    assert skipped.count(False) >= 3, "after backing off, most steps must update the weights"
    assert all("grad norm" in line for line, s in zip(steps, skipped) if not s)


def test_expert_parallel_matches_one_process(tmp_path):
    args = [*FAST, *NO_SAVE, "model=tiny_moe", "stage.train_iters=3"]
    run_llmtrain(*args, f"hydra.run.dir={tmp_path / 'ep1'}")
    run_llmtrain(*args, "parallel.expert_model_parallel_size=2",
                 "parallel.data_parallel_size=2", f"hydra.run.dir={tmp_path / 'ep2'}")
    assert summary(tmp_path / "ep2")["losses"] == pytest.approx(
        summary(tmp_path / "ep1")["losses"], rel=1e-5)


def _saved_tensor(checkpoints, key: str):
    import torch
    import torch.distributed.checkpoint as dcp

    step = sorted(checkpoints.glob("iter_*"))[-1]
    reader = dcp.FileSystemReader(str(step))
    meta = reader.read_metadata().state_dict_metadata[key]
    tensor = {key: torch.empty(meta.size, dtype=meta.properties.dtype)}
    dcp.load(tensor, storage_reader=reader, no_dist=True)
    return tensor[key]


def test_moe_routing_options_and_each_layers_expert_load(tmp_path):
    """Aux-loss-free balancing (sigmoid scores, a per-expert bias moved after each step), token
    dropping (capacity factor 0.5: at most half of the routers' choices fit), and each layer's
    expert load in the log and the summary."""
    args = [*FAST, "model=tiny_moe", "stage.train_iters=2", "optim.lr_warmup_iters=0",
            "logging.log_interval=1"]
    out = run_llmtrain(*args, "model.moe_router_score_function=sigmoid",
                       "model.moe_router_enable_expert_bias=true",
                       "model.moe_router_load_balancing_type=none",
                       f"hydra.run.dir={tmp_path / 'bias'}").stdout
    assert "step      2 | expert load imbalance (busiest / mean) of layers 0-3: " in out
    metrics = summary(tmp_path / "bias")["metrics"]
    # Top-2 of 4 experts: an expert takes at most every token, twice the mean.
    assert all(1.0 < v <= 2.0 for v in metrics["moe_load_imbalance_max"])
    assert "moe_dropped_fraction" not in metrics
    bias = _saved_tensor(tmp_path / "bias" / "checkpoints", "decoder.layers.mlp.router.expert_bias")
    # Every layer's biases moved (by the update rate, 1e-3, a step: up for the less loaded).
    assert bias.shape == (4, 4) and (bias.abs().amax(1) > 0).all()

    run_llmtrain(*args, *NO_SAVE, "model.moe_expert_capacity_factor=0.5",
                 f"hydra.run.dir={tmp_path / 'drop'}")
    dropped = summary(tmp_path / "drop")["metrics"]["moe_dropped_fraction"]
    assert len(dropped) == 2 and all(0.5 <= d < 1.0 for d in dropped)


def test_profile_writes_a_trace_and_says_where_the_time_went(tmp_path):
    process = run_llmtrain(*FAST, *NO_SAVE, "stage.train_iters=4", "logging.profile=true",
                           "logging.profile_step_start=2", "logging.profile_step_end=3",
                           f"hydra.run.dir={tmp_path}")
    assert "profile of steps 2-3 on rank 0" in process.stdout
    with gzip.open(tmp_path / "profile" / "rank0_steps2-3.json.gz", "rt") as trace:
        names = {event.get("name") for event in json.load(trace)["traceEvents"]}
    assert "aten::mm" in names  # the matrix products of the profiled steps
    assert "aten::mm" in (tmp_path / "profile" / "rank0_summary.txt").read_text()


def test_gpu_summary_splits_busy_time_by_kernel_kind():
    kernels = [  # microseconds: two overlapping kernels, a 100 us gap, a copy
        {"cat": "kernel", "name": "sm90_xmma_gemm_bf16", "ts": 0, "dur": 300},
        {"cat": "kernel", "name": "cudnn_fmha_fprop", "ts": 200, "dur": 200},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 500, "dur": 100},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1000},
    ]
    text = gpu_summary(kernels, steps=1)
    assert "busy 83.3%, idle 0.1 ms per step" in text  # 500 of the 600 us window
    shares = {kind: line.split()[-1] for kind in ("matrix products", "attention", "memory copies")
              for line in text.splitlines() if line.strip().startswith(kind)}
    assert shares == {"matrix products": "50.0%", "attention": "33.3%", "memory copies": "16.7%"}
    assert gpu_summary(kernels[3:], steps=1) is None  # no GPU activity: a CPU run


def test_gpt_oss_trains_on_the_local_layers(tmp_path):
    """A shrunken gpt-oss (sinks, a window on the first layer, YaRN, biased experts with the
    clamped gated unit) trains on CPU: Megatron-Core adds the biased experts' weighted bias to
    their output in place, which autograd refuses on its local layers without llmtrain's
    expert layer (llmtrain.megatron.specs)."""
    run_llmtrain(*FAST, *NO_SAVE, "model=gpt_oss_20b", "model.num_layers=2",
                 "model.hidden_size=64", "model.ffn_hidden_size=32", "model.num_attention_heads=4",
                 "model.num_query_groups=2", "model.kv_channels=16", "model.num_moe_experts=4",
                 "model.moe_router_topk=2", "model.window_size=[7,0]",
                 "model.original_max_position_embeddings=32", "model.rotary_scaling_factor=4.0",
                 "stage.global_batch_size=2", "stage.train_iters=3", "optim.lr_warmup_iters=1",
                 f"hydra.run.dir={tmp_path}")
    losses = summary(tmp_path)["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]
