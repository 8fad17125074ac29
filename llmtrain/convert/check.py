"""Verification: the Hugging Face model and the Megatron model on the same prompts, layer by layer.

Both run on the CPU in the check's format. For the input of the first layer (the embedding's
output), every layer's output and the final logits the report gives the largest absolute
difference, the largest absolute value of the Hugging Face side (the scale the difference is
judged against) and the cosine similarity, each the worst over the prompts. A row passes when
max_abs_diff <= max_rel_diff x max_abs_reference and cosine >= min_cosine.

Tolerances per format: fp32 leaves room for summation order only (the same weights computed in
another order differ by about 1e-6 relative); bf16 and fp16 for their rounding, which both
implementations apply at different points.
"""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Optional

import torch

from llmtrain.convert.families import Family
from llmtrain.megatron.probe import EMBEDDING, LOGITS, layer_name

TOLERANCES = {  # dtype: (max_rel_diff, min_cosine)
    "fp32": (1e-4, 0.99999),
    "bf16": (5e-2, 0.999),
    "fp16": (1e-2, 0.9999),
}


def tokenize(folder: Optional[Path], prompts: list[str], vocab_size: int, max_tokens: int,
             seed: int) -> tuple[list[list[int]], str]:
    """Token ids of the prompts with the checkpoint's own tokenizer, or, when it has none,
    seeded random ids (the report says which)."""
    from llmtrain.convert.hf_files import has_tokenizer

    if has_tokenizer(folder):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        sequences = [tokenizer(p)["input_ids"][:max_tokens] for p in prompts]
        if all(sequences) and max(max(s) for s in sequences) < vocab_size:
            return sequences, f"the tokenizer in {folder}"
    generator = random.Random(seed)
    sequences = [[generator.randrange(vocab_size) for _ in range(max(4, min(max_tokens, 16)))]
                 for _ in prompts]
    return sequences, "random token ids (no tokenizer found)"


def _get(model: torch.nn.Module, path: str):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _first_input(record: dict, module, args, kwargs):
    record[EMBEDDING] = kwargs.get("hidden_states", args[0] if args else None)


def _output(record: dict, index: int, module, args, output):
    record[layer_name(index)] = output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def hf_records(folder: Path, family: Family, sequences: list[list[int]],
               dtype: torch.dtype) -> list[dict]:
    """The Hugging Face model's embedding output, layer outputs and logits per sequence."""
    from transformers import AutoConfig, AutoModelForCausalLM, Mxfp4Config

    # MXFP4 experts (gpt-oss) dequantized, as the conversion reads them, on a GPU machine too.
    quantized = getattr(AutoConfig.from_pretrained(str(folder)), "quantization_config", None)
    extra = {"quantization_config": Mxfp4Config(dequantize=True)} if (
        quantized or {}).get("quant_method") == "mxfp4" else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                 attn_implementation="eager", **extra)
    model.eval()
    layers = _get(model, family.layers)
    records = []
    for ids in sequences:
        record: dict = {}
        handles = [layers[0].register_forward_pre_hook(partial(_first_input, record),
                                                       with_kwargs=True)]
        handles += [layer.register_forward_hook(partial(_output, record, i))
                    for i, layer in enumerate(layers)]
        logits = model(torch.tensor([ids])).logits
        for handle in handles:
            handle.remove()
        record = {name: t[0].float() for name, t in record.items()}
        record[LOGITS] = logits[0].float()
        records.append(record)
    del model
    return records


def _row(name: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], max_rel_diff: float,
         min_cosine: float) -> dict:
    diff = max(float((m.double() - h.double()).abs().max()) for m, h in pairs)
    scale = max(float(h.abs().max()) for _, h in pairs)
    cosine = min(float(torch.nn.functional.cosine_similarity(
        m.double().flatten(), h.double().flatten(), dim=0)) for m, h in pairs)
    passed = diff <= max_rel_diff * scale and cosine >= min_cosine
    return {"name": name, "max_abs_diff": diff, "max_abs_reference": scale, "cosine": cosine,
            "passed": passed}


def compare(megatron: list[dict], hf: list[dict], num_layers: int, max_rel_diff: float,
            min_cosine: float) -> dict:
    """Rows for the embedding output, each layer and the logits, plus top-1 agreement."""
    names = [EMBEDDING] + [layer_name(i) for i in range(num_layers)] + [LOGITS]
    rows = []
    for name in names:
        pairs = [(m[name], h[name]) for m, h in zip(megatron, hf)]
        shapes = {(tuple(m.shape), tuple(h.shape)) for m, h in pairs}
        if any(a != b for a, b in shapes):
            raise ValueError(f"{name}: the Megatron and Hugging Face outputs differ in shape "
                             f"({shapes})")
        rows.append(_row(name, pairs, max_rel_diff, min_cosine))
    agree = [float((m[LOGITS].argmax(-1) == h[LOGITS].argmax(-1)).float().mean())
             for m, h in zip(megatron, hf)]
    return {"rows": rows, "top1_agreement": min(agree),
            "passed": all(r["passed"] for r in rows)}


def table(result: dict) -> str:
    """The rows as the console shows them."""
    tolerance = result["tolerance"]
    lines = [f"check in {result['dtype']} on {len(result['sequences'])} prompt(s) "
             f"({result['tokens']}); tolerance for {tolerance['dtype']}: max |diff| <= "
             f"{tolerance['max_rel_diff']:g} x max |ref|, cosine >= {tolerance['min_cosine']}",
             f"{'':14}{'max |diff|':>12}{'max |ref|':>12}{'cosine':>14}",
             *(f"{r['name']:<14}{r['max_abs_diff']:>12.3e}{r['max_abs_reference']:>12.3e}"
               f"{r['cosine']:>14.9f}{'' if r['passed'] else '   EXCEEDED'}"
               for r in result["rows"]),
             f"top-1 agreement of the logits: {result['top1_agreement']:.3f}"]
    return "\n".join(lines)
