"""One training (or evaluation) step through Megatron-Core's pipeline schedules."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_batch_on_this_cp_rank

from llmtrain.megatron.data import packed_seq_params


@dataclass
class StepResult:
    loss: float | None  # mean per-token loss over the global batch (None off the last stage)
    tokens: int  # loss tokens in the global batch (0 off the last stage)
    grad_norm: float | None = None
    skipped: bool = False
    # Means of the stage's own measures ("metric/<name>" reports: accuracy, reward, KL, ...).
    metrics: dict[str, float] = field(default_factory=dict)


# A forward step: (device, data iterator, model chunk) -> (output, loss function), as the
# schedules call it; alignment stages bring their own (llmtrain.megatron.align).
ForwardStep = Callable
METRIC = "metric/"


def _loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Sum of token losses and token count: the schedule divides once by the global count."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(output.float().reshape(-1) * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), mask.sum().detach()])
    return loss_sum, num_tokens, {"lm loss": report}


def _forward(device: str, data_iterator, model):
    batch = next(data_iterator)
    if ps.get_context_parallel_world_size() > 1:
        # Each context-parallel rank keeps two of 2 x CP sequence chunks (zigzag, load-balanced).
        batch = get_batch_on_this_cp_rank(
            {k: v for k, v in batch.items() if k != "attention_mask"}, is_hybrid_cp=False,
            cp_group=ps.get_context_parallel_group())
    move = partial(torch.Tensor.to, device=device, non_blocking=True)
    tokens, labels = move(batch["tokens"]), move(batch["labels"])
    position_ids, loss_mask = move(batch["position_ids"]), move(batch["loss_mask"])
    attention_mask = batch.get("attention_mask")
    if attention_mask is not None:
        attention_mask = move(attention_mask)
    packed = packed_seq_params(batch, device)  # packed SFT sequences on the GPU
    output = model(tokens, position_ids, attention_mask, labels=labels, packed_seq_params=packed)
    return output, partial(_loss, loss_mask)


def _reduce_losses(reports: list[dict], groups: Optional[ProcessGroupCollection] = None
                   ) -> tuple[float | None, int, dict[str, float]]:
    """Sum micro-batch reports ([sum, count] of the loss and of every "metric/<name>") on the
    last stage and across data-parallel ranks (of `groups`, a model's own, when given)."""
    if groups is None and not ps.is_pipeline_last_stage(ignore_virtual=True) or not reports:
        return None, 0, {}
    keys = ["lm loss"] + sorted(k for k in reports[0] if k.startswith(METRIC))
    total = torch.stack([torch.stack([r[k] for r in reports]).sum(dim=0) for k in keys])
    torch.distributed.all_reduce(total, group=groups.dp_cp if groups is not None
                                 else ps.get_data_parallel_group(with_context_parallel=True))
    sums = total.tolist()
    loss_sum, tokens = sums[0]
    metrics = {k[len(METRIC):]: s / max(n, 1.0) for k, (s, n) in zip(keys[1:], sums[1:])}
    return loss_sum / max(tokens, 1.0), int(tokens), metrics


def schedule_name() -> str:
    """Megatron's schedule for this layout: no pipelining, 1F1B, or interleaved 1F1B (VPP)."""
    return get_forward_backward_func().__name__


def run_schedule(model: list, iterators: list, num_microbatches: int, seq_length: int,
                 micro_batch_size: int, device: str, forward_only: bool,
                 forward: Optional[ForwardStep] = None,
                 groups: Optional[ProcessGroupCollection] = None) -> list[dict]:
    """`groups`: a model built on process groups of its own, without pipeline stages
    (llmtrain.megatron.align.placement); None: the run's layout and its schedule."""
    schedule = get_forward_backward_func() if groups is None else partial(
        forward_backward_no_pipelining, pg_collection=groups)
    return schedule(
        forward_step_func=partial(forward or _forward, device),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(model: list, optimizer, scheduler, iterators: list, num_microbatches: int,
               seq_length: int, micro_batch_size: int, device: str,
               guard: Optional[Callable[[list], bool]] = None,
               forward: Optional[ForwardStep] = None,
               groups: Optional[ProcessGroupCollection] = None) -> StepResult:
    """`guard(reports)` may veto the update after the backward pass (a NaN loss or gradient);
    `groups`: those the model was built with, when not the run's (see `run_schedule`)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(model, iterators, num_microbatches, seq_length, micro_batch_size,
                           device, forward_only=False, forward=forward, groups=groups)
    vetoed = guard is not None and not guard(reports)  # first: it may see (or inject) a NaN
    loss, tokens, metrics = _reduce_losses(reports, groups)
    if vetoed:
        return StepResult(loss, tokens, skipped=True, metrics=metrics)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    return StepResult(loss, tokens, None if grad_norm is None else float(grad_norm),
                      skipped=not updated, metrics=metrics)


def eval_step(model: list, iterators: list, num_microbatches: int, seq_length: int,
              micro_batch_size: int, device: str) -> StepResult:
    loss, tokens, metrics = _reduce_losses(forward_only(
        model, iterators, num_microbatches, seq_length, micro_batch_size, device))
    return StepResult(loss, tokens, metrics=metrics)


@torch.no_grad()
def forward_only(model: list, iterators: list, num_microbatches: int, seq_length: int,
                 micro_batch_size: int, device: str, forward: Optional[ForwardStep] = None,
                 groups: Optional[ProcessGroupCollection] = None) -> list[dict]:
    """The micro-batch reports of a pass without gradients, in eval mode (no dropout): on the
    last pipeline stage, whatever the loss functions returned; elsewhere []."""
    for chunk in model:
        chunk.eval()
    try:
        return run_schedule(model, iterators, num_microbatches, seq_length, micro_batch_size,
                            device, forward_only=True, forward=forward, groups=groups)
    finally:
        for chunk in model:
            chunk.train()
