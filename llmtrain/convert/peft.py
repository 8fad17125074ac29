"""LoRA adapters between llmtrain checkpoints and Hugging Face PEFT adapter folders.

`direction=lora_to_peft` writes adapter_config.json and adapter_model.safetensors that
`peft.PeftModel.from_pretrained` loads onto the Hugging Face base; `direction=mcore_to_hf` on an
adapter checkpoint merges the adapters into the base and writes the whole model. Each of
Megatron's per-projection adapter pairs is one PEFT adapter (llmtrain.megatron.lora), so the
tensors are copied, not split or refitted. Llama-style families only (their projections' names).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from llmtrain.config.validate import lora_targets

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FAMILIES = ("llama", "qwen3")  # Llama, Mistral, Qwen2 and Qwen3 share the llama family's names
# Megatron's adapter parts -> the Hugging Face modules (below model.layers.<i>.).
MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "proj": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "fc2": "mlp.down_proj"}
_NAME = re.compile(r"decoder\.layers\.(\d+)\.\w+\.linear_\w+_lora\.([AB])_(\w+)")
_HF = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(\w+\.\w+)\.lora_([AB])\.weight")


def hf_name(name: str) -> str:
    """`decoder.layers.3.self_attention.linear_qkv_lora.A_q` ->
    `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`."""
    layer, matrix, part = _NAME.fullmatch(name).groups()
    return f"base_model.model.model.layers.{layer}.{MODULES[part]}.lora_{matrix}.weight"


def mcore_name(name: str, target_of: dict[str, str]) -> str:
    """The inverse of hf_name; `target_of`: part -> `self_attention.linear_qkv` and the like."""
    match = _HF.fullmatch(name)
    if match is None:
        raise ValueError(f"{name} is no LoRA tensor of a Llama-style model's projections")
    layer, module, matrix = match.groups()
    part = next(p for p, m in MODULES.items() if m == module)
    return f"decoder.layers.{layer}.{target_of[part]}_lora.{matrix}_{part}"


def adapter_config(peft, base: str) -> dict:
    """PEFT's LoraConfig as it saves it, for what llmtrain trained."""
    modules = {"linear_qkv": ["q_proj", "k_proj", "v_proj"], "linear_proj": ["o_proj"],
               "linear_fc1": ["gate_proj", "up_proj"], "linear_fc2": ["down_proj"]}
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": peft.r, "lora_alpha": peft.lora_alpha, "lora_dropout": peft.lora_dropout,
            "target_modules": sorted(m for t in lora_targets(peft) for m in modules[t]),
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}


def write(folder: Path, tensors: dict, peft, base: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({hf_name(k): v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS),
              metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(adapter_config(peft, base), indent=2) + "\n")
