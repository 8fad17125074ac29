"""`python -m llmtrain.bench [options] [overrides]`: llmtrain's training step beside its peers.

In one process tree on one machine it runs
  1. llmtrain itself: `python -m llmtrain <overrides>` (data, logging and checkpointing as the
     overrides say), its step times read from the run's summary.json;
  2. the bare Megatron-Core step of the same shape (llmtrain/megatron/bench_peer.py);
  3. the Hugging Face transformers step of the same shape (llmtrain/bench/hf_peer.py),
  4. with --peers full, a peft=lora run's full fine-tune (the same overrides with peft=none),
and prints tokens/s, TFLOP/s, MFU and peak memory of each, with ratios to llmtrain. Figures are
medians over the steps after warm-up. Benchmarks are not tests: nothing here asserts a speed.

    python -m llmtrain.bench model=llama3_2_1b precision=bf16 data.seq_length=4096 \
        stage.micro_batch_size=6 stage.global_batch_size=48
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llmtrain.cli import CONF_DIR, resolve_run
from llmtrain.config.plan import flops_per_token, peak_tflops
from llmtrain.config.store import register
from llmtrain.config.validate import validate
from llmtrain.runtime import detect_machine

ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed:\n{process.stdout[-3000:]}\n"
                           f"{process.stderr[-3000:]}")
    return process.stdout


def _peer(module: str, spec: dict) -> dict:
    """A peer's result, or its failure (the table shows it; the other figures still count)."""
    try:
        out = _run([sys.executable, "-m", module, json.dumps(spec)])
    except RuntimeError as error:
        return {"failed": str(error).strip().splitlines()[-1][:60]}
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def run_overrides(overrides: list[str], steps: int, warmup: int) -> list[str]:
    """The user's overrides sized to the benchmark's own run: `warmup + steps` iterations, no
    checkpoint unless asked for, no evaluation, and a learning-rate schedule that fits them (a
    warm-up over the untimed steps, then constant; the learning rate does not change a step's
    time), whatever the optimizer's or stage's group says for a full run."""
    return ["checkpoint.save=null", *overrides, f"stage.train_iters={warmup + steps}",
            "stage.train_tokens=null", "stage.epochs=null", "stage.eval_interval=0",
            "optim.lr_decay_style=constant", f"optim.lr_warmup_iters={warmup}",
            "optim.lr_warmup_tokens=null", "optim.lr_decay_iters=null",
            "optim.lr_decay_tokens=null"]


def llmtrain_step_times(overrides: list[str], steps: int, warmup: int) -> dict:
    """llmtrain's own run of `warmup + steps` iterations: its timed step seconds and peak memory."""
    with tempfile.TemporaryDirectory() as run_dir:
        _run([sys.executable, "-m", "llmtrain", *run_overrides(overrides, steps, warmup),
              f"hydra.run.dir={run_dir}"])
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return {"step_seconds": summary["step_seconds"][warmup:],
            "peak_memory_gib": summary["memory/peak_gib"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--peers", default="mcore,hf",
                        help="comma-separated peers to run beside llmtrain: mcore, hf, hf-compile, "
                             "full (a peft=lora run's full fine-tune: the same overrides, peft=none)")
    parser.add_argument("overrides", nargs="*", help="llmtrain config overrides")
    args = parser.parse_args()

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        dcfg = compose("config", overrides=run_overrides(args.overrides, args.steps, args.warmup))
    dcfg.output_dir = "."
    cfg = resolve_run(dcfg)
    machine = detect_machine()
    layout = validate(cfg, machine)
    if layout.device != "cuda" or layout.world_size != 1:
        raise SystemExit("llmtrain.bench compares one-GPU training steps: run it on a GPU "
                         "machine with a one-GPU layout (parallel=tp1pp1, launcher.nproc_per_node=1)")
    tokens_per_step = cfg.stage.global_batch_size * cfg.data.seq_length
    fpt = flops_per_token(cfg.model, layout.padded_vocab_size, cfg.data.seq_length)
    import torch

    peak = peak_tflops(torch.cuda.get_device_name())
    spec = {"model": dataclasses.asdict(cfg.model), "seq_length": cfg.data.seq_length,
            "micro_batch_size": cfg.stage.micro_batch_size,
            "num_microbatches": layout.num_microbatches,
            "padded_vocab_size": layout.padded_vocab_size, "fp8": cfg.precision.fp8,
            "fp8_recipe": cfg.precision.fp8_recipe, "steps": args.steps, "warmup": args.warmup}

    results = {"llmtrain": llmtrain_step_times(args.overrides, args.steps, args.warmup)}
    for peer in filter(None, args.peers.split(",")):
        if peer == "mcore":
            results["megatron-core (bare)"] = _peer("llmtrain.megatron.bench_peer", spec)
        elif peer == "full":
            full = [o for o in args.overrides if not o.startswith(("peft", "checkpoint.load"))]
            try:
                results["llmtrain full fine-tune"] = llmtrain_step_times(
                    [*full, "peft=none"], args.steps, args.warmup)
            except RuntimeError as error:  # out of memory, say: the table shows it
                results["llmtrain full fine-tune"] = {
                    "failed": str(error).strip().splitlines()[-1][:60]}
        elif peer in ("hf", "hf-compile"):
            if cfg.precision.fp8:
                continue  # transformers has no FP8 training path to compare with
            results[f"transformers{' + compile' if peer == 'hf-compile' else ''}"] = _peer(
                "llmtrain.bench.hf_peer", {**spec, "compile": peer == "hf-compile"})
        else:
            raise SystemExit(f"unknown peer {peer!r}: choose from mcore, hf, hf-compile, full")

    print(f"\n{cfg.model.name}, {cfg.precision.name}"
          f"{' ' + cfg.precision.fp8_recipe if cfg.precision.fp8 else ''}, seq "
          f"{cfg.data.seq_length}, micro batch {cfg.stage.micro_batch_size}, global batch "
          f"{cfg.stage.global_batch_size}, {torch.cuda.get_device_name()}; median of "
          f"{args.steps} steps after {args.warmup} warm-up")
    print(f"{'':<32}{'tokens/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'vs llmtrain':>13}")
    base = None
    for name, result in results.items():
        if "failed" in result:
            print(f"{name:<32}failed: {result['failed']}")
            continue
        if result.get("micro_batch_size", cfg.stage.micro_batch_size) != cfg.stage.micro_batch_size:
            name = f"{name} (micro {result['micro_batch_size']})"
        speed = tokens_per_step / statistics.median(result["step_seconds"])
        base = base or speed
        tflops = speed * fpt / 1e12
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
        print(f"{name:<32}{speed:>10,.0f}{tflops:>9.1f}{mfu:>7}"
              f"{result['peak_memory_gib']:>10.1f}{speed / base:>12.3f}x")
    if cfg.peft.name != "none":
        print("TFLOP/s and MFU count a full training step (6 x parameters per token); an adapter "
              "run skips the frozen weights' gradients, about a third of that")


if __name__ == "__main__":
    main()
