"""Tiny pretraining runs as a user starts them: the loss falls, checkpoints resume exactly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import FAST, ROOT, run_llmtrain, summary


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


def test_a_cpu_model_keeps_cpu_norms_where_transformer_engine_is_installed():
    # Megatron's default final norm is Transformer Engine's whenever TE is importable, and TE's
    # norm fails on CPU tensors: a conversion's check on a GPU machine did. Stand in for an
    # installed TE with a norm that refuses to be built.
    script = """
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29617", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
sys.path.insert(0, "tests")
import megatron.core.transformer.transformer_block as block
class InstalledTENorm:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("Transformer Engine's norm built for a CPU model")
block.LayerNormImpl = InstalledTENorm
from conftest import compose_config
from llmtrain.config.layout import Machine
from llmtrain.config.validate import validate
from llmtrain.megatron import parallel
from llmtrain.megatron.model import build_model
cfg = compose_config("model=tiny")
layout = validate(cfg, Machine())
parallel.initialize(layout, cfg.seed)
norm = type(build_model(cfg, layout)[0].decoder.final_layernorm)
print(norm.__module__, norm.__name__)
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.strip().splitlines()[-1] == "torch.nn.modules.normalization RMSNorm"


def test_a_gpu_without_transformer_engine_builds_and_runs_megatrons_own_layers():
    # Megatron's fused softmax and persistent LayerNorm are Apex kernels: asked for on a GPU
    # without Transformer Engine (and without Apex), the model failed to build. Build the GPU
    # config's local layers here (parameters on the CPU) and run a bf16 forward through them.
    script = """
import os, sys
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29618", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
sys.path.insert(0, "tests")
import torch
from megatron.core.models.gpt import GPTModel
from conftest import compose_config
from llmtrain.config.layout import Machine
from llmtrain.config.validate import validate
from llmtrain.megatron import parallel
from llmtrain.megatron.model import block_spec, transformer_config
cfg = compose_config("model=tiny", "precision=bf16", "model.normalization=LayerNorm")
gpu = validate(cfg, Machine(gpus=1, has_transformer_engine=False, gpu_capability=(9, 0)))
assert gpu.device == "cuda" and not gpu.use_transformer_engine
parallel.initialize(validate(cfg, Machine()), cfg.seed)
config = transformer_config(cfg, gpu)
config.bias_dropout_fusion = config.bias_activation_fusion = False  # torch.compile: not tested
model = GPTModel(config=config, transformer_layer_spec=block_spec(cfg, gpu, config, None),
                 vocab_size=gpu.padded_vocab_size, max_sequence_length=64).to(torch.bfloat16)
tokens = torch.randint(0, 100, (2, 32))
logits = model(tokens, torch.arange(32).expand(2, 32), None)
print(tuple(logits.shape), logits.dtype)
"""
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.returncode == 0, process.stderr[-2000:]
    assert process.stdout.strip().splitlines()[-1] == "(2, 32, 4096) torch.bfloat16"
