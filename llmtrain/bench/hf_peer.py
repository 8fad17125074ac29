"""The Hugging Face transformers peer of `python -m llmtrain.bench`: a plain training step.

The same architecture as a transformers model (SDPA attention, bf16 autocast over fp32 weights,
fused AdamW), optionally torch.compile'd: what a user of plain transformers runs. Reads a JSON spec
on argv[1]; prints one JSON result line.
"""

from __future__ import annotations

import json
import sys
import time

import torch

# ModelConfig fields -> transformers config fields, per family the peer supports.
FAMILIES = {
    "llama": "LlamaConfig",
    "mistral": "MistralConfig",
    "qwen2": "Qwen2Config",
}


def hf_config(m: dict):
    import transformers

    if m["family"] not in FAMILIES:
        raise SystemExit(f"the Hugging Face peer supports the families {sorted(FAMILIES)}, "
                         f"not {m['family']}")
    config_class = getattr(transformers, FAMILIES[m["family"]])
    rope = {"rope_type": "llama3", "factor": m["rope_scaling_factor"], "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
            "rope_theta": m["rotary_base"]} if m["rope_scaling"] else {
        "rope_type": "default", "rope_theta": m["rotary_base"]}
    return config_class(
        vocab_size=m["vocab_size"], hidden_size=m["hidden_size"],
        intermediate_size=m["ffn_hidden_size"], num_hidden_layers=m["num_layers"],
        num_attention_heads=m["num_attention_heads"],
        num_key_value_heads=m["num_query_groups"] or m["num_attention_heads"],
        max_position_embeddings=m["max_position_embeddings"], rms_norm_eps=m["layernorm_epsilon"],
        tie_word_embeddings=m["share_embeddings_and_output_weights"], rope_parameters=rope,
        attn_implementation="sdpa")


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
    model = AutoModelForCausalLM.from_config(hf_config(spec["model"])).cuda()
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
