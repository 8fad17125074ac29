"""A NaN or infinite loss or gradient, caught after the backward pass and before the weight update.

Each rank checks its own loss (last pipeline stage) and gradient buffers; one all-reduce tells
every rank the lowest rank that saw a problem, which describes it (the value; for a gradient, the
first parameter it is in) for all. Then every rank stops together (`optim.on_nonfinite=stop`) or
skips the update of that step (`skip`), so weights and optimizer moments never take a NaN.
With fp16 the loss scaler already skips steps whose gradients overflow: only the loss is checked.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from llmtrain import faults
from llmtrain.config.schema import Config
from llmtrain.errors import RunStopped
from llmtrain.megatron.checkpoint import unwrap


class NonFiniteGuard:
    """`guard(iteration, reports)` returns whether the step may update the weights."""

    def __init__(self, cfg: Config, model: list, device: str, say):
        self.enabled = cfg.optim.check_for_nan_in_loss_and_grad
        self.skip = cfg.optim.on_nonfinite == "skip"
        self.check_grads = not cfg.precision.fp16
        self.model, self.device, self.say = model, device, say

    def __call__(self, iteration: int, reports: list[dict]) -> bool:
        rank, world = dist.get_rank(), dist.get_world_size()
        faults.poison(iteration, rank, self.model, reports)
        if not self.enabled:
            return True
        loss = _local_loss(reports)
        loss_bad = loss is not None and not math.isfinite(loss)
        grads_bad = self.check_grads and not self._grads_finite()
        first = torch.tensor([rank if loss_bad else world, rank if grads_bad else world],
                             dtype=torch.int64, device=self.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        loss_rank, grad_rank = (int(v) for v in first.tolist())
        if loss_rank == world and grad_rank == world:
            return True
        culprit = min(loss_rank, grad_rank)
        what = None
        if rank == culprit:
            what = (f"the loss is {loss} on rank {rank}" if loss_bad
                    else f"a gradient is not finite on rank {rank}: {self._bad_gradient()}")
            what += f" ({_coordinates()})"
        box = [what]
        dist.broadcast_object_list(box, src=culprit)
        message = f"step {iteration}: {box[0]}"
        if not self.skip:
            raise RunStopped(f"{message}. Stopped before the weight update: the weights and "
                             f"the optimizer state are those after step {iteration - 1}, and "
                             f"the latest checkpoint is untouched. Resume with a lower optim.lr, "
                             f"or set optim.on_nonfinite=skip to skip such steps")
        self.say(f"warning: {message}; the step is skipped: no weight update "
                 f"(optim.on_nonfinite=skip)")
        return False

    def _grads_finite(self) -> bool:
        # Sums propagate NaN and inf, and cost one read of the gradients.
        sums = [buffer.grad_data.sum().float() for chunk in self.model
                for buffer in chunk.buffers + chunk.expert_parallel_buffers]
        return not sums or bool(torch.isfinite(torch.stack(sums)).all())

    def _bad_gradient(self) -> str:
        for chunk in self.model:
            for name, param in unwrap(chunk).named_parameters():
                grad = getattr(param, "main_grad", None)
                if grad is None:
                    continue
                bad = ~torch.isfinite(grad)
                count = int(bad.sum())
                if count:
                    value = grad[bad].view(-1)[0].item()
                    return f"{name} holds {count} non-finite value(s), the first {value}"
        return "the gradient buffers hold non-finite values"


def _local_loss(reports: list[dict]) -> Optional[float]:
    """This rank's mean loss over its micro-batches (None off the last pipeline stage)."""
    if not reports:
        return None
    loss_sum, tokens = torch.stack([r["lm loss"] for r in reports]).sum(dim=0).tolist()
    return loss_sum / max(tokens, 1.0)


def _coordinates() -> str:
    return (f"pipeline stage {ps.get_pipeline_model_parallel_rank()}, tensor-parallel rank "
            f"{ps.get_tensor_model_parallel_rank()}, data-parallel rank "
            f"{ps.get_data_parallel_rank()}")
