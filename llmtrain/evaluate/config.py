"""Typed config of `python -m llmtrain.evaluate` (conf/evaluate.yaml is merged onto it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class PerplexityConfig:
    """Perplexity of the served model on held-out Megatron indexed datasets."""

    # Prefixes of <prefix>.bin/.idx pairs (as `python -m llmtrain` takes data.data_path); empty:
    # no perplexity.
    data_path: list[str] = field(default_factory=list)
    # Tokens per window (documents run end to end, cut into windows); null: the server's
    # context length.
    seq_length: Optional[int] = None
    # At most this many windows per dataset; null: all of it.
    max_windows: Optional[int] = None
    # Windows per request.
    batch_size: int = 8


@dataclass
class EvaluateConfig:
    """What to evaluate (exactly one of server, load, hf) on what (tasks, perplexity)."""

    # A running `python -m llmtrain.serve`, as http://HOST:PORT.
    server: Optional[str] = None
    # A checkpoint: a server is started for the evaluation (on a free port) and stopped after.
    load: Optional[str] = None
    # Overrides for that server, e.g. [tensor_model_parallel_size=2, model=llama3_2_1b].
    serve_overrides: list[str] = field(default_factory=list)
    # A Hugging Face folder (e.g. written by python -m llmtrain.convert direction=mcore_to_hf):
    # lm-evaluation-harness runs it with transformers.
    hf: Optional[str] = None
    # lm-evaluation-harness tasks (names, or those of YAML files under include_path).
    tasks: list[str] = field(default_factory=list)
    include_path: Optional[str] = None
    num_fewshot: Optional[int] = None
    # Documents per task: a count, or a fraction below 1.
    limit: Optional[float] = None
    # Prompts per request (per forward with hf=).
    batch_size: int = 8
    # Requests in flight at once (the server batches them together).
    num_concurrent: int = 1
    # Chat tasks through /v1/chat/completions with the model's chat template.
    apply_chat_template: bool = False
    # Tokens of a generation task's answer; null: 256, at most a quarter of the context.
    max_gen_toks: Optional[int] = None
    seed: int = 1234
    # Where results.json and results.md are written.
    output_dir: str = "eval_results"
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)


def register() -> None:
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)
