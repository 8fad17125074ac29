"""Carry out a plan: start the worker processes, finish the written folder (Hugging Face index,
config, tokenizer; model config), verify, and write the conversion report."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import yaml

from llmtrain.convert import hf_files, worker
from llmtrain.convert.check import TOLERANCES, compare, hf_records, table
from llmtrain.convert.plan import Plan
from llmtrain.launch.local import launch

REPORT = "conversion_report.json"
# From the finest to the coarsest format.
PRECISION_ORDER = ["fp32", "fp16", "bf16"]
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
               "expert_model_parallel_size")
# Files of a Megatron checkpoint folder that do not belong in a Hugging Face one.
NOT_HF = (REPORT, "latest_checkpointed_iteration.txt")


class CheckFailed(RuntimeError):
    """The converted model's outputs differ from the original's beyond the tolerances."""


def _write_model_yaml(plan: Plan, folder: Path) -> Path:
    """The model as a conf/model entry, usable with hydra.searchpath=[file://<folder>]."""
    path = folder / "model" / f"{plan.model.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Written by python -m llmtrain.convert from {plan.job.input}\n"
                    + yaml.safe_dump(dataclasses.asdict(plan.model), sort_keys=False))
    return path


def _finish_hf_folder(plan: Plan, folder: Path, parts: list) -> None:
    """Index the weight files; add config.json (the input's, or one made from the model) and the
    tokenizer; record the format written, and that it is not quantized."""
    source = Path(plan.job.input)
    buffers = hf_files.read_layout(source)[1]
    if buffers:
        from safetensors.torch import save_file

        save_file(buffers, str(folder / "part-buffers.safetensors"), metadata={"format": "pt"})
        parts = [*parts, {"part-buffers.safetensors": list(buffers)}]
    hf_files.finish_index(folder, parts)
    if (source / hf_files.CONFIG).exists():
        hf_files.copy_side_files(source, folder, skip=NOT_HF)
    else:
        plan.family.hf_config(plan.model).save_pretrained(str(folder))
        if plan.convert.tokenizer:
            hf_files.copy_side_files(Path(plan.convert.tokenizer), folder,
                                     skip=NOT_HF + (hf_files.CONFIG,))
    config = json.loads((folder / hf_files.CONFIG).read_text())
    key = "torch_dtype" if "torch_dtype" in config else "dtype"
    stored = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[plan.job.dtype]
    # The weights are written unquantized (an MXFP4 import comes back dequantized).
    written = {k: v for k, v in config.items() if k != "quantization_config"} | {key: stored}
    if written != config:
        (folder / hf_files.CONFIG).write_text(json.dumps(written, indent=2) + "\n")


def tolerance_dtype(plan: Plan) -> str:
    """The format whose tolerances apply: the check's, or the written one where the conversion
    rounds the weights to it (fp32 into bf16, say)."""
    formats = {plan.job.check_dtype}
    if plan.job.dtype != plan.source_dtype:
        formats.add(plan.job.dtype)
    return max(formats, key=PRECISION_ORDER.index)


def _verify(plan: Plan, records: list, hf_folder: Path) -> dict:
    c = plan.convert
    judged_as = tolerance_dtype(plan)
    default_rel, default_cos = TOLERANCES[judged_as]
    max_rel = c.max_rel_diff if c.max_rel_diff is not None else default_rel
    min_cos = c.min_cosine if c.min_cosine is not None else default_cos
    reference = hf_records(hf_folder, plan.family, plan.job.sequences,
                           worker.TORCH_DTYPES[plan.job.check_dtype])
    result = compare(records, reference, plan.model.num_layers, max_rel, min_cos)
    return {"dtype": plan.job.check_dtype, "hugging_face": str(hf_folder),
            "tolerance": {"dtype": judged_as, "max_rel_diff": max_rel, "min_cosine": min_cos},
            "tokens": plan.tokens_from, "sequences": plan.job.sequences, **result}


def _memory(plan: Plan, workers: list[int]) -> dict:
    """Peak resident memory against the model's size in the written format: the conversion
    processes' peaks summed (an upper bound of what they held at once), and this process's
    (the check's Hugging Face model)."""
    size = plan.family.parameters(plan.model) * worker.TORCH_DTYPES[plan.job.dtype].itemsize
    return {"model_bytes": size, "processes_peak_rss_bytes": workers,
            "main_peak_rss_bytes": worker.peak_rss()}


def _memory_line(memory: dict) -> str:
    gib, size = 2 ** 30, memory["model_bytes"]
    workers, main = sum(memory["processes_peak_rss_bytes"]), memory["main_peak_rss_bytes"]
    count = len(memory["processes_peak_rss_bytes"])
    line = f"[convert] peak memory: {workers / gib:.2f} GiB"
    if count > 1:
        line += f" over the {count} conversion processes together"
    line += f" ({workers / size:.1f}x the model's {size / gib:.2f} GiB)"
    if count > 1:  # one process converts in this one
        line += f", {main / gib:.2f} GiB in this one ({main / size:.1f}x)"
    return line


def execute(plan: Plan, say=print) -> dict:
    """Run the conversion; return the report (raise CheckFailed when the check fails)."""
    began = time.perf_counter()
    job = plan.job
    scratch = None
    if job.direction == "mcore_to_hf" and job.output is None:
        scratch = Path(tempfile.mkdtemp(prefix="llmtrain-check-"))
        job = dataclasses.replace(job, output=str(scratch))
    created = job.output is not None and not Path(job.output).exists()
    if job.output:
        Path(job.output).mkdir(parents=True, exist_ok=True)
    ep = plan.layout.expert_model_parallel_size
    say(f"[convert] {job.direction}: {job.input} -> {job.output or '(check only)'}; model "
        f"{plan.model.name} ({plan.family.name}), {job.dtype}, on {plan.layout.world_size} "
        f"process(es) (TP {plan.layout.tensor_model_parallel_size} x PP "
        f"{plan.layout.pipeline_model_parallel_size}" + (f" x EP {ep})" if ep > 1 else ")"))
    for note in plan.notes:
        say(f"[convert] note: {note}")
    try:
        result = launch(plan.cfg, plan.layout, entry=partial(worker.run, job))
        out = Path(job.output) if job.output else None
        report = {"direction": job.direction, "input": job.input,
                  "output": None if scratch else job.output, "family": plan.family.name,
                  "model": dataclasses.asdict(plan.model), "dtype": job.dtype,
                  "layout": {key: getattr(plan.layout, key) for key in LAYOUT_KEYS}}
        if job.direction == "mcore_to_hf":
            _finish_hf_folder(plan, out, result["hf_parts"])
        elif out is not None and job.direction != "lora_to_peft":
            if job.direction == "hf_to_mcore":
                hf_files.copy_side_files(Path(job.input), out)
                hf_files.save_layout(Path(job.input), out, plan.family.base_prefix,
                                     plan.family.mapping(plan.model).is_ignored)
            report["model_config"] = str(_write_model_yaml(plan, out))
        if "records" in result:
            hf_folder = out if job.direction == "mcore_to_hf" else Path(job.input)
            report["check"] = _verify(plan, result["records"], hf_folder)
            say(table(report["check"]))
        if "identical" in result:
            report["check"] = {**result["identical"],
                               "passed": not result["identical"]["differing"]}
            say(f"[convert] read back: {report['check']['tensors']} tensors, "
                f"{len(report['check']['differing'])} differing")
        report["memory"] = _memory(plan, result["peak_rss"])
        say(_memory_line(report["memory"]))
        report["seconds"] = round(time.perf_counter() - began, 1)
        if out is not None and not scratch:
            (out / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    except BaseException:
        # A conversion that stopped half way leaves no half-written folder behind.
        if created and not scratch:
            shutil.rmtree(job.output, ignore_errors=True)
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if "check" in report and not report["check"]["passed"]:
        raise CheckFailed("the converted model differs from the original beyond the "
                          "tolerances (rows marked EXCEEDED)" + (
                              f"; the report is in {out / REPORT}" if out and not scratch else ""))
    return report
