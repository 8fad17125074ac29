"""LoRA adapters between llmtrain checkpoints and Hugging Face PEFT adapter folders.

`direction=lora_to_peft` writes adapter_config.json and adapter_model.safetensors that
`peft.PeftModel.from_pretrained` loads onto the Hugging Face base; `direction=mcore_to_hf` on an
adapter checkpoint merges the adapters into the base and writes the whole model; `peft.load`
(training) and `peft_load` (generation, serving) read such a folder back (`imported`, checked
here in pure Python before launch). Each of Megatron's per-projection adapter pairs is one PEFT
adapter (llmtrain.megatron.lora), so the tensors are copied, not split or refitted. Llama-style
families only (their projections' names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from llmtrain.config.validate import LORA_LAYERS, lora_targets

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FAMILIES = ("llama", "qwen3")  # Llama, Mistral, Qwen2 and Qwen3 share the llama family's names
# Megatron's adapter parts -> the Hugging Face modules (below model.layers.<i>.).
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "proj": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "fc2": "mlp.down_proj"}
# Megatron's layers -> the Hugging Face projections an adapter on it stands for.
HF_MODULES = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
              "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}
_NAME = re.compile(r"decoder\.layers\.(\d+)\.\w+\.linear_\w+_lora\.([AB])_(\w+)")


def hf_name(name: str) -> str:
    """`decoder.layers.3.self_attention.linear_qkv_lora.A_q` ->
    `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`."""
    layer, matrix, part = _NAME.fullmatch(name).groups()
    return f"base_model.model.model.layers.{layer}.{MODULES[part]}.lora_{matrix}.weight"


def adapter_config(peft, base: str) -> dict:
    """PEFT's LoraConfig as it saves it, for what llmtrain trained."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": peft.r, "lora_alpha": peft.lora_alpha, "lora_dropout": peft.lora_dropout,
            "target_modules": sorted(m for t in lora_targets(peft) for m in HF_MODULES[t]),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


def write(folder: Path, tensors: dict, peft, base: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({hf_name(k): v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS),
              metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(adapter_config(peft, base), indent=2) + "\n")


# What llmtrain's adapters cannot be, with what to do instead: (key, its harmless values, why).
_REFUSED = (
    ("use_dora", (False, None), "DoRA (use_dora=true) is not supported: merge it into the base "
     "with peft's merge_and_unload() and give the merged model as checkpoint.load"),
    ("use_rslora", (False, None), "rank-stabilised LoRA (use_rslora=true, a scale of "
     "alpha / sqrt(r)) is not supported: merge it into the base with peft's merge_and_unload()"),
    ("modules_to_save", (None, []), "modules_to_save (whole trained copies of {value}) cannot be "
     "placed on a frozen base: merge the adapter with peft's merge_and_unload() instead"),
    ("bias", ("none", None), "bias={value!r}: llmtrain's adapters train no biases"),
    ("fan_in_fan_out", (False, None), "fan_in_fan_out=true (GPT-2's Conv1D) is not supported"),
    ("layers_to_transform", (None, []), "layers_to_transform={value}: llmtrain puts adapters on "
     "every layer"),
    ("rank_pattern", (None, {}), "rank_pattern={value}: llmtrain uses one rank for every layer"),
    ("alpha_pattern", (None, {}), "alpha_pattern={value}: llmtrain uses one alpha for every "
     "layer"),
)


def imported(folder: str, model) -> tuple[dict, list[str]]:
    """(peft.* settings, problems) of a PEFT LoRA folder trained elsewhere for `model` (a
    ModelConfig): rank, alpha, dropout and the Megatron layers it targets, from its
    adapter_config.json; its tensors' names and shapes (the safetensors header) checked against
    the model. A fused layer (qkv, gate/up) with some of its projections untargeted gets zero
    adapters for the others, which stay zero in training."""
    where = f"peft.load={folder}"
    path = Path(folder)
    missing = [n for n in (CONFIG, WEIGHTS) if not (path / n).is_file()]
    if missing:
        return {}, [f"{where} lacks {' and '.join(missing)}: give a folder written by peft's "
                    f"save_pretrained (adapter_config.json + adapter_model.safetensors)"]
    config = json.loads((path / CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        return {}, [f"{where} holds a {config.get('peft_type')} adapter: only LoRA ones load"]
    problems = [f"{where}: {why.format(value=config.get(key))}" for key, fine, why in _REFUSED
                if config.get(key, fine[0]) not in fine]
    if model.family not in FAMILIES:
        problems.append(f"{where}: PEFT folders load onto the {', '.join(FAMILIES)} families "
                        f"(their projections' names), not {model.family}")
    wanted = config.get("target_modules") or []
    if isinstance(wanted, str):
        wanted = [wanted]
    by_hf = {m: layer for layer, modules in HF_MODULES.items() for m in modules}
    unplaced = sorted(m for m in wanted if m not in by_hf)
    if unplaced:
        problems.append(f"{where}: target_modules {unplaced} have no place in llmtrain's "
                        f"adapters, which go on {', '.join(sorted(by_hf))}")
    settings = {"r": config.get("r"), "lora_alpha": float(config.get("lora_alpha", 0)),
                "lora_dropout": float(config.get("lora_dropout") or 0.0),
                "target_modules": [l for l in LORA_LAYERS
                                   if any(by_hf.get(m) == l for m in wanted)]}
    if not problems:
        problems += _shape_problems(where, path / WEIGHTS, settings["r"], model,
                                    [m for m in wanted if m in by_hf])
    return settings, problems


def _shapes(model, r: int) -> dict[str, tuple[list[int], list[int]]]:
    """Hugging Face module -> the shapes of its (lora_A, lora_B) on `model`."""
    d = model.kv_channels or model.hidden_size // model.num_attention_heads
    h, q = model.hidden_size, model.num_attention_heads * d
    kv = (model.num_query_groups or model.num_attention_heads) * d
    ffn = model.ffn_hidden_size
    outs_ins = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                "gate_proj": (ffn, h), "up_proj": (ffn, h), "down_proj": (h, ffn)}
    return {m: ([r, i], [o, r]) for m, (o, i) in outs_ins.items()}


def _shape_problems(where: str, weights: Path, r: int, model, modules: list[str]) -> list[str]:
    header = _header(weights)
    expected = {f"base_model.model.model.layers.{layer}.{MODULES[p]}.lora_{m}.weight": shape
                for layer in range(model.num_layers) for p in MODULES
                if MODULES[p].split(".")[1] in modules
                for m, shape in zip("AB", _shapes(model, r)[MODULES[p].split(".")[1]])}
    problems = []
    foreign = sorted(set(header) - set(expected))
    if foreign:
        problems.append(f"{where}: {len(foreign)} tensor(s) that llmtrain cannot place on "
                        f"model {model.name} ({model.num_layers} layers), e.g. {foreign[0]}")
    absent = sorted(set(expected) - set(header))
    if absent:
        problems.append(f"{where}: {len(absent)} adapter tensor(s) missing, e.g. {absent[0]}")
    wrong = [f"{n} {header[n]} (model {model.name} needs {expected[n]})"
             for n in sorted(set(header) & set(expected)) if header[n] != expected[n]]
    if wrong:
        problems.append(f"{where} was trained for another base model: {len(wrong)} tensor(s) "
                        f"of another shape, e.g. {wrong[0]}; give checkpoint.load the model "
                        f"the adapter was trained on")
    return problems


def _header(weights: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's JSON header (no tensor is read)."""
    with open(weights, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}
