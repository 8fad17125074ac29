"""The Hugging Face transformers peer of `python -m llmtrain.bench`: a plain training step.

The same architecture as a transformers model, built from the config its family's conversion
writes (so every family with a Hugging Face mapping has a peer): SDPA attention, bf16 autocast over
fp32 weights, fused AdamW, optionally torch.compile'd: what a user of plain transformers runs.
Reads a JSON spec on argv[1]; prints one JSON result line.
"""

from __future__ import annotations

import json
import sys
import time

import torch


def hf_config(m: dict):
    """The transformers config of the spec's model, as the family's conversion writes it."""
    from llmtrain.config.schema import ModelConfig
    from llmtrain.convert.families import by_name
    from llmtrain.convert.mapping import ConversionError

    try:
        return by_name(m["family"]).hf_config(ModelConfig(**m))
    except ConversionError as error:
        raise SystemExit(f"no Hugging Face peer: {error}") from None


def main(spec: dict) -> dict:
    """Run at the spec's micro batch; where that does not fit (transformers materialises the
    fp32 logits), halve it and accumulate twice as many: the global batch stays the same."""
    micro, micro_batches = spec["micro_batch_size"], spec["num_microbatches"]
    while True:
        try:
            return {**train(spec, micro, micro_batches), "micro_batch_size": micro}
        except torch.OutOfMemoryError:
            if micro == 1:
                raise
            micro, micro_batches = micro // 2, micro_batches * 2
            torch.cuda.empty_cache()


def train(spec: dict, micro: int, micro_batches: int) -> dict:
    from transformers import AutoModelForCausalLM

    seq = spec["seq_length"]
    model = AutoModelForCausalLM.from_config(hf_config(spec["model"]),
                                                 attn_implementation="sdpa").cuda()
    model.gradient_checkpointing_disable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_fn = model
    if spec.get("compile"):
        step_fn = torch.compile(model)
    tokens = torch.randint(0, spec["model"]["vocab_size"], (micro, seq), device="cuda")
    step_times = []
    for step in range(spec["warmup"] + spec["steps"]):
        torch.cuda.synchronize()
        began = time.perf_counter()
        for _ in range(micro_batches):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = step_fn(input_ids=tokens, labels=tokens).loss / micro_batches
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= spec["warmup"]:
            step_times.append(time.perf_counter() - began)
    return {"step_seconds": step_times,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 1024**3}


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
