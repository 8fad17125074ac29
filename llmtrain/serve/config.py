"""Typed config of `python -m llmtrain.serve` (conf/serve.yaml is merged onto it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore

from llmtrain.generate.config import InferenceConfig


@dataclass
class ServeConfig(InferenceConfig):
    """An HTTP server for one checkpoint: OpenAI's completions and chat APIs, Megatron-LM's
    `PUT /api`. The KV cache settings (inference_max_batch_size, inference_max_seq_length) bound
    every batch."""

    # Sequences generated together: clients come and go, and the decode engine admits each
    # into a free row of the KV cache as it arrives (generate's default is 8).
    inference_max_batch_size: int = 64
    # Megatron-LM's text generation server listens on 0.0.0.0:5000; here only this machine
    # reaches it unless host=0.0.0.0. port=0: a free port (printed when ready).
    host: str = "127.0.0.1"
    port: int = 5000
    # The model name clients pass (OpenAI's "model"); null: the model config's name.
    served_model_name: Optional[str] = None
    # How long a batch waits for more requests to join once the first one is in (milliseconds).
    batch_wait_ms: float = 10.0
    # Log every request's JSON (Megatron-LM logs them unless no_log).
    log_requests: bool = False
    # A request body over this many bytes gets a 413 before it is read (null: no limit).
    max_request_bytes: Optional[int] = 16 * 2 ** 20


def register() -> None:
    ConfigStore.instance().store(name="serve_schema", node=ServeConfig)
