"""Bytes of activations a tiny model keeps for backward, for one micro-batch (run as a script).

    python tests/activation_memory.py <overrides...>   ->  prints {"saved_bytes": N}

Counts every tensor autograd saves during the forward pass (each storage once), which is what
activation recomputation is meant to shrink; it runs the model llmtrain builds, on the CPU.
"""

import json
import os
import sys

import torch

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PORT", "29613"), RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import compose_config  # noqa: E402
from llmtrain.config.layout import Machine
from llmtrain.config.validate import validate  # noqa: E402
from llmtrain.megatron import parallel  # noqa: E402
from llmtrain.megatron.init import initialize  # noqa: E402
from llmtrain.megatron.model import build_model  # noqa: E402


def main(overrides: list[str]) -> None:
    cfg = compose_config(*overrides)
    layout = validate(cfg, Machine())
    parallel.initialize(layout, cfg.seed)
    model = build_model(cfg, layout)[0]
    initialize([model], cfg.seed)
    b, s = cfg.stage.micro_batch_size, cfg.data.seq_length
    tokens = torch.randint(0, cfg.model.vocab_size, (b, s))
    positions = torch.arange(s).unsqueeze(0).expand(b, -1)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    seen, total = set(), 0

    def pack(tensor):
        nonlocal total
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen and not isinstance(tensor, torch.nn.Parameter):
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, positions, mask, labels=tokens).float().mean()
    loss.backward()
    print(json.dumps({"saved_bytes": total, "loss": loss.item()}))
    parallel.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
