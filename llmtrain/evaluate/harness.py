"""lm-evaluation-harness against the served model (its `local-completions` model, or
`local-chat-completions` with apply_chat_template) or a Hugging Face folder (its `hf` model)."""

from __future__ import annotations

from typing import Optional

from llmtrain.evaluate.config import EvaluateConfig
from llmtrain.evaluate.server import Served

DEFAULT_GEN_TOKENS = 256


def model_spec(c: EvaluateConfig, served: Optional[Served]) -> tuple[str, dict]:
    """lm-eval's model name and model_args."""
    if served is None:
        import torch

        return "hf", {"pretrained": c.hf, "dtype": "auto",
                      "device": "cuda" if torch.cuda.is_available() else "cpu"}
    gen = c.max_gen_toks or min(DEFAULT_GEN_TOKENS, served.max_length // 4)
    common = {"model": served.model, "max_length": served.max_length, "max_gen_toks": gen,
              "num_concurrent": c.num_concurrent, "seed": c.seed, "max_retries": 1}
    if c.apply_chat_template:
        return "local-chat-completions", {**common,
                                          "base_url": f"{served.url}/v1/chat/completions"}
    # The server's /tokenize and /tokenizer_info give lm-eval the model's own tokenizer.
    return "local-completions", {**common, "base_url": f"{served.url}/v1/completions",
                                 "tokenizer_backend": "remote", "tokenized_requests": True}


def run(c: EvaluateConfig, served: Optional[Served]) -> dict:
    """lm-eval's results (results, versions, n-shot, configs ...)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, args = model_spec(c, served)
    manager = TaskManager(include_path=c.include_path) if c.include_path else TaskManager()
    limit = c.limit if c.limit is None or c.limit < 1 else int(c.limit)
    # Chat-completions requests carry one conversation each.
    batch = 1 if c.apply_chat_template and served is not None else c.batch_size
    return simple_evaluate(model=model, model_args=args, tasks=list(c.tasks),
                           num_fewshot=c.num_fewshot, batch_size=batch, limit=limit,
                           apply_chat_template=c.apply_chat_template, task_manager=manager,
                           log_samples=False, random_seed=c.seed, numpy_random_seed=c.seed,
                           torch_random_seed=c.seed, fewshot_random_seed=c.seed)
