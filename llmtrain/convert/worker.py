"""What every conversion process does, under the layout the launcher gave it.

The Megatron model comes from the same builder as training (`llmtrain.megatron.model`), is
filled or read one whole tensor at a time (`llmtrain.megatron.weights`) and saved or loaded with
training's own checkpoint code, so what is written here is what training loads. The check runs
a fresh model loaded back from the written checkpoint, in the check's format.
"""

from __future__ import annotations

import dataclasses
import gc
import resource
from pathlib import Path

import torch

from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config, PrecisionConfig
from llmtrain.convert import families, hf_files, legacy
from llmtrain.convert import peft as peft_files
from llmtrain.convert.job import Job
from llmtrain.megatron import checkpoint, lora, lora_checkpoint, parallel, probe, weights
from llmtrain.megatron.model import build_model
from llmtrain.runtime import quiet_libraries

PRECISIONS = {"fp32": PrecisionConfig(name="fp32"),
              "bf16": PrecisionConfig(name="bf16", bf16=True),
              "fp16": PrecisionConfig(name="fp16", fp16=True)}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def run(job: Job, cfg: Config, layout: Layout) -> dict:
    """Entry point of each worker; rank 0 returns what the main process reports."""
    quiet_libraries()
    parallel.initialize(layout, cfg.seed)
    try:
        result = _DIRECTIONS[job.direction](job, cfg, layout) or {}
        peaks = weights.gather_to_first(peak_rss())
        return {**result, "peak_rss": peaks} if peaks is not None else result
    finally:
        parallel.shutdown()


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux counts it in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _build(cfg: Config, layout: Layout, dtype: str) -> list:
    """The training builder's model, every tensor in `dtype` (the weight buffers in fp32):
    Megatron makes norms and position embeddings in fp32 whatever the precision, and training's
    mixed-precision wrapper casts them; converted weights are stored in one format, like a
    training checkpoint."""
    chunks = [chunk.to(TORCH_DTYPES[dtype]) for chunk in
              build_model(dataclasses.replace(cfg, precision=PRECISIONS[dtype]), layout)]
    for chunk in chunks:
        weights.weight_buffers_in_fp32(chunk)
    return chunks


def _fresh(cfg: Config, layout: Layout, dtype: str, root: str, iteration: int,
           job: Job | None = None, merged: bool = True) -> list:
    """A new model loaded from a written checkpoint the way training loads it; a LoRA run's
    step (job.base set) goes onto its base, its adapters `merged` into the base weights or
    applied as training applies them."""
    chunks = _build(cfg, layout, dtype)
    if job is None or job.base is None:
        checkpoint.load(root, iteration, chunks, None, None, weights_only=True)
        return chunks
    _with_adapters(job, chunks)
    if merged:
        lora.merge(chunks)
    return chunks


def _with_adapters(job: Job, chunks: list) -> None:
    lora_checkpoint.load_with_adapters(job.input, job.iteration, chunks, job.base, job.peft)


def _lora_to_peft(job: Job, cfg: Config, layout: Layout) -> dict:
    chunks = _build(cfg, layout, job.dtype)
    _with_adapters(job, chunks)
    tensors = {name: tensor.clone() for name, tensor in weights.whole_tensors(chunks)
               if lora.is_adapter_key(name)}
    everyone = weights.gather_to_first(tensors if weights.is_first_of_tensor_group() else {})
    if everyone is not None:
        peft_files.write(Path(job.output), {k: v for part in everyone for k, v in part.items()},
                         job.peft, str(Path(job.base).parent))
    return {}


def _probe(job: Job, chunks: list) -> dict:
    records = probe.run(chunks, job.sequences, job.model.vocab_size)
    return {"records": records} if records is not None else {}


def _hf_to_mcore(job: Job, cfg: Config, layout: Layout) -> dict:
    family = families.by_name(job.model.family)
    mapping = family.mapping(job.model)
    reader = hf_files.HFReader(Path(job.input), family.base_prefix)
    # Verifying only: the check's model gets the weights as they would be written.
    chunks = _build(cfg, layout, job.check_dtype if job.output is None else job.dtype)
    written = TORCH_DTYPES[job.dtype]
    weights.load_whole_tensors(
        chunks, lambda name, shape: _stored(name, mapping.to_mcore(name, reader.read, shape),
                                            written))
    if job.output is not None:
        checkpoint.save(job.output, 0, chunks, None, None, {"converted_from": job.input})
        del chunks
        gc.collect()
        if job.check_dtype is None:
            return {}
        chunks = _fresh(cfg, layout, job.check_dtype, job.output, 0)
    return _probe(job, chunks)


def _stored(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor in the format written, a weight buffer (the expert bias) in fp32."""
    return tensor.float() if weights.is_weight_buffer(name) else tensor.to(dtype)


def _mcore_to_hf(job: Job, cfg: Config, layout: Layout) -> dict:
    mapping = families.by_name(job.model.family).mapping(job.model)
    chunks = _fresh(cfg, layout, job.dtype, job.input, job.iteration, job)
    writer = None
    if weights.tensor_rank() == 0:  # what a TP group gathers, its first rank writes
        prefix = f"part-pp{weights.pipeline_rank():03d}-ep{weights.expert_rank():03d}"
        writer = hf_files.ShardWriter(Path(job.output), prefix, job.max_shard_bytes)
    dtype = TORCH_DTYPES[job.dtype]
    for name, tensor in weights.whole_tensors(chunks):
        if writer is not None and weights.writes(name) and not lora.is_adapter_key(name):
            for hf_name, hf_tensor in mapping.to_hf(name, tensor).items():
                if job.strip_prefix and hf_name.startswith(job.strip_prefix):
                    hf_name = hf_name[len(job.strip_prefix):]
                writer.add(hf_name, _stored(name, hf_tensor, dtype))
    parts = weights.gather_to_first(writer.close() if writer else None)
    result = {"hf_parts": sorted((p for p in parts or [] if p), key=lambda p: sorted(p))}
    if job.check_dtype is not None:
        # A LoRA step is checked as it trains: the adapters beside the base, not merged.
        if job.check_dtype != job.dtype or job.base:
            del chunks
            gc.collect()
            chunks = _fresh(cfg, layout, job.check_dtype, job.input, job.iteration, job,
                            merged=False)
        result.update(_probe(job, chunks))
    return result if parts is not None else {}


def _megatron_to_mcore(job: Job, cfg: Config, layout: Layout) -> dict:
    source = job.legacy.file(weights.tensor_rank(), weights.pipeline_rank())
    state = legacy.model_state(legacy.read(source), source)
    chunks = _build(cfg, layout, job.dtype)
    with torch.no_grad():
        chunks[0].load_state_dict(state, strict=True)
    checkpoint.save(job.output, 0, chunks, None, None, {"converted_from": job.input})
    if job.check_dtype is None:
        return {}
    del chunks
    gc.collect()
    # Read back as training reads it, compared with the original files tensor by tensor (in the
    # format written).
    loaded = _fresh(cfg, layout, job.dtype, job.output, 0)[0].state_dict()
    differing = [name for name, tensor in state.items()
                 if not torch.equal(loaded[name], tensor.to(loaded[name].dtype))]
    counts = weights.gather_to_first((len(state), differing))
    if counts is None:
        return {}
    return {"identical": {"tensors": sum(c[0] for c in counts),
                          "differing": [n for c in counts for n in c[1]]}}


_DIRECTIONS = {"hf_to_mcore": _hf_to_mcore, "mcore_to_hf": _mcore_to_hf,
               "megatron_to_mcore": _megatron_to_mcore, "lora_to_peft": _lora_to_peft}
