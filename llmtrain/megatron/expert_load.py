"""How evenly each MoE layer's router spreads a training step's tokens over its experts, from
forward hooks on Megatron-Core's routers (nothing patched): the load that aux-loss and
aux-loss-free balancing act on, per layer, for the training log and TensorBoard.

A layer's imbalance is its busiest expert's tokens over the mean (1.0: even; the number of
experts / top-k at worst). Ratios are what is reported, so the copies that tensor parallelism
(every TP rank routes the same tokens) and recomputation (routing twice) add do not change them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import TopKRouter


class ExpertLoad:
    def __init__(self, chunks: list, num_layers: int, num_experts: int, device: str):
        # Per layer: tokens routed to each expert, then the (token, expert) choices made before
        # any was dropped for capacity.
        self.counts = torch.zeros(num_layers, num_experts + 1, dtype=torch.float64,
                                  device=device)
        for chunk in chunks:
            for module in chunk.modules():
                if isinstance(module, TopKRouter):
                    module.register_forward_hook(self._count)

    def _count(self, router: TopKRouter, inputs, output) -> None:
        if router.training:  # evaluation and generation do not count
            routing_map = output[1]
            with torch.no_grad():
                row = self.counts[router.layer_number - 1]
                row[:-1] += routing_map.sum(0)
                row[-1] += routing_map.shape[0] * router.topk

    def take(self) -> tuple[dict[int, float], float]:
        """Each MoE layer's imbalance since the last call ({layer: imbalance}; the dense layers
        among them, DeepSeek's first, route nothing), and the fraction of the routers' choices
        dropped for capacity, over every rank's tokens (collective); the counts start again."""
        counts, self.counts = self.counts, torch.zeros_like(self.counts)
        dist.all_reduce(counts)
        routed, chosen = counts[:, :-1], counts[:, -1]
        imbalance = routed.max(1).values / routed.mean(1).clamp(min=1e-12)
        dropped = 1.0 - routed.sum() / chosen.sum().clamp(min=1e-12)
        layers = [i for i, choices in enumerate(chosen.tolist()) if choices]
        return {i: imbalance[i].item() for i in layers}, dropped.item()
