"""Typed configs of `python -m llmtrain.generate` (conf/generate.yaml) and the model settings it
shares with `llmtrain.serve` and `llmtrain.evaluate`. Names follow Megatron-LM's inference
arguments (`--inference-max-batch-size`, `--num-tokens-to-generate`, `--top_k`, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from llmtrain.config.schema import LauncherConfig, ModelConfig

DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class InferenceConfig:
    """Which checkpoint, under which layout, with how much KV cache."""

    # A checkpoint folder (with latest_checkpointed_iteration.txt: its latest step) or one of its
    # iter_NNNNNNN/ folders: a training run's checkpoints or a converted model.
    load: str = MISSING
    # model=<name> (conf/model/) for a checkpoint that does not say which model it holds.
    model: Optional[ModelConfig] = None
    # A Hugging Face tokenizer folder or tokenizer.json (or a sentencepiece .model) when the
    # checkpoint has none beside it.
    tokenizer: Optional[str] = None
    # A Hugging Face PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for the
    # model `load` holds: merged into its weights as they load (docs/lora.md).
    peft_load: Optional[str] = None
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    # fp32 | bf16 | fp16; null: bf16 on a GPU, fp32 on the CPU.
    dtype: Optional[str] = None
    # null: the GPU when there is one.
    device: Optional[str] = None
    # Sequences run together (the KV cache holds this many).
    inference_max_batch_size: int = 8
    # Longest prompt + generation; null: the model's max_position_embeddings, at most 4096.
    inference_max_seq_length: Optional[int] = None
    seed: int = 1234
    # auto: the decode engine (continuous batching, CUDA-graph decode) where it covers the model
    # on one rank per replica, else Megatron-Core's (static batches; any TP x PP and family).
    # megatron: Megatron-Core's always.
    engine: str = "auto"
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


@dataclass
class SamplingConfig:
    """How tokens are chosen (the defaults of every prompt)."""

    # Always the most likely token (the same as temperature=0 or top_k=1).
    greedy: bool = False
    temperature: float = 1.0
    # 0: off. top_k and top_p may be combined (top-k first, as transformers does).
    top_k: int = 0
    top_p: float = 0.0
    # > 1 discourages tokens already in the sequence (transformers' repetition_penalty).
    repetition_penalty: float = 1.0
    num_tokens_to_generate: int = 128
    # Generate num_tokens_to_generate tokens even past an end-of-sequence token (benchmarks).
    ignore_eos: bool = False


@dataclass
class GenerateConfig(InferenceConfig):
    """Offline generation: a file of prompts in, a JSON-lines file out."""

    # One prompt per line (plain text), or JSON lines with "prompt" (text) or "messages" (a chat:
    # [{"role": ..., "content": ...}], rendered with the tokenizer's chat template).
    input: str = MISSING
    # JSON lines: every input record with its generation (see docs/generate_serve.md).
    output: str = MISSING
    # auto: jsonl for .jsonl/.json files, lines otherwise.
    input_format: str = "auto"
    # Longer prompts keep their last tokens; null: whatever leaves room for the generation.
    max_prompt_length: Optional[int] = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


def register() -> None:
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)


def compose(name: str, register_schema, overrides: list[str]):
    """The typed config `python -m llmtrain.<tool> <overrides>` runs (conf/<name>.yaml), for
    the tools' Python APIs."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from llmtrain.cli import CONF_DIR, resolve
    from llmtrain.config.store import register as register_training

    register_schema()
    register_training()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return resolve(hydra_compose(name, overrides=list(overrides)))
