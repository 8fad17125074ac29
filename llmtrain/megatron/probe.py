"""Run a model on token sequences and record what each layer produced, under any TP/PP layout.

Used to verify a converted checkpoint against its Hugging Face original: the input of the first
layer (the embedding's output), the output of every layer, and the final logits (gathered over
the TP group, padding of the vocabulary cut off), each as a [tokens, features] float32 tensor.
The forward runs through Megatron's own pipeline schedule, so PP stages pass activations as in
training.
"""

from __future__ import annotations

from functools import partial

import torch

# Names of what is recorded; the Hugging Face side of a check records under the same names, and
# imports them from here without importing Megatron (which `run` imports when called).
EMBEDDING = "embedding"
LOGITS = "logits"


def layer_name(index: int) -> str:
    return f"layer {index}"


def _first_hidden(record: dict, module, args, kwargs):
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    record[EMBEDDING] = hidden


def _layer_output(record: dict, index: int, module, args, output):
    record[layer_name(index)] = output[0] if isinstance(output, tuple) else output


def _forward(tokens: torch.Tensor, data_iterator, model):
    next(data_iterator)
    length = tokens.size(1)
    positions = torch.arange(length).unsqueeze(0)
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)[None, None]
    return model(tokens, positions, causal), None


@torch.no_grad()
def run(chunks: list, sequences: list[list[int]], vocab_size: int) -> list[dict] | None:
    """Per sequence, {name: tensor} of the embedding output, every layer's output and the
    logits, collected on global rank 0 (None on the other ranks)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from llmtrain.megatron.weights import gather_to_first, is_first_of_tensor_group

    for chunk in chunks:
        chunk.eval()
    records = []
    for ids in sequences:
        record: dict = {}
        handles = []
        for chunk in chunks:
            for layer in chunk.decoder.layers:
                index = layer.layer_number - 1
                if index == 0:
                    handles.append(layer.register_forward_pre_hook(
                        partial(_first_hidden, record), with_kwargs=True))
                handles.append(layer.register_forward_hook(partial(_layer_output, record, index)))
        tokens = torch.tensor([ids], dtype=torch.long)
        outputs = get_forward_backward_func()(
            forward_step_func=partial(_forward, tokens),
            data_iterator=[iter([None]) for _ in chunks] if len(chunks) > 1 else iter([None]),
            model=chunks, num_microbatches=1, seq_length=len(ids), micro_batch_size=1,
            forward_only=True)
        for handle in handles:
            handle.remove()
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            logits = gather_from_tensor_model_parallel_region(outputs[0])
            record[LOGITS] = logits[0, :, :vocab_size]
        # [tokens, batch=1, hidden] -> [tokens, hidden]
        records.append({name: (t[:, 0] if t.dim() == 3 and name != LOGITS else t).float().clone()
                        for name, t in record.items()})
    mine = records if is_first_of_tensor_group() else None
    gathered = gather_to_first(mine)
    if gathered is None:
        return None
    merged = [dict() for _ in sequences]
    for per_rank in gathered:
        for merged_record, record in zip(merged, per_rank or []):
            merged_record.update(record)
    return merged
