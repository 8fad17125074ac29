"""Alignment roles with a tensor-parallel layout of their own, colocated with the trained model.

The run's layout (`parallel=`) is the trained model's. The other roles (the reference policy, a
reward model, PPO's critic) may take another tensor-parallel size, without pipeline stages
(stage.alignment.<role>_tensor_model_parallel_size). TP 1 keeps a whole copy on every rank and
never communicates, where the trained model needs TP > 1 for its optimizer state; a TP above the
run's spreads a large reward model over ranks that train as data-parallel replicas.

A role covers every rank in groups of that many consecutive ranks (tensor parallelism
innermost, as in Megatron's own order), with process groups of its own (Megatron-Core's
ProcessGroupCollection), so parallel_state keeps describing the trained model.

Every rank holds its replica's rows (a replica: the trained model's data-parallel rank; all its
ranks hold the same rows). A role group whose ranks belong to several replicas gathers each
replica's micro-batches once, runs them all, and each rank keeps its own replica's outputs. A
trained role (the critic) learns from all of them: where a replica's rows are on several of its
data-parallel ranks, the gradient mean counts each replica equally, as the trained model does.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.process_groups_config import ProcessGroupCollection

from llmtrain.config.layout import Layout


def _own_group(rank_lists: list[list[int]]):
    """Make every group (a collective: each rank makes all of them, in the same order); return
    the one this rank is in."""
    mine = None
    for ranks in rank_lists:
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


class Placement:
    """A role's process groups, and which replicas' rows its tensor-parallel group runs."""

    def __init__(self, tensor_parallel: int):
        world, size = dist.get_world_size(), tensor_parallel
        self.tensor_parallel = size
        tp = _own_group([list(range(start, start + size)) for start in range(0, world, size)])
        dp = _own_group([list(range(first, world, size)) for first in range(size)])
        alone = _own_group([[rank] for rank in range(world)])
        # A dense model without pipeline or context parallelism: the model-parallel groups are
        # the tensor-parallel one, the others hold one rank (DDP, the optimizer and the gradient
        # finalisation of a trained role read them all).
        groups = ProcessGroupCollection()
        groups.tp = groups.tp_cp = groups.mp = groups.tp_ep = groups.tp_ep_pp = tp
        groups.expt_tp = tp
        groups.pp = groups.cp = groups.embd = groups.pos_embd = groups.ep = alone
        groups.dp = groups.dp_cp = groups.intra_dp_cp = dp
        groups.expt_dp = groups.intra_expt_dp = dp
        groups.tp_dp_cp = dist.group.WORLD
        self.groups = groups
        replicas = [None] * size
        dist.all_gather_object(replicas, ps.get_data_parallel_rank(), group=tp)
        # The first rank of each distinct replica in the group brings that replica's rows.
        distinct = list(dict.fromkeys(replicas))
        self.sources = [replicas.index(r) for r in distinct]
        self.mine = distinct.index(ps.get_data_parallel_rank())

    def gather(self, micro: list[dict], device: str) -> list[dict]:
        """The micro-batches of every replica in this rank's group, replica by replica."""
        if len(self.sources) == 1:
            return micro
        gathered = [[dict(batch) for batch in micro] for _ in self.sources]
        for k, batch in enumerate(micro):
            for key, value in batch.items():
                if not isinstance(value, torch.Tensor):
                    continue
                parts = [torch.empty_like(value, device=device)
                         for _ in range(self.tensor_parallel)]
                dist.all_gather(parts, value.to(device).contiguous(), group=self.groups.tp)
                for copy, source in zip(gathered, self.sources):
                    copy[k][key] = parts[source]
        return [batch for copy in gathered for batch in copy]

    def own(self, outputs: list, count: int) -> list:
        """This rank's replica's share of the outputs of `gather`'s micro-batches."""
        return outputs[self.mine * count:(self.mine + 1) * count]

    def layout(self, run: Layout) -> Layout:
        """The run's layout with the role's tensor parallelism and nothing else split, not even
        sequences (sequence parallelism saves activation memory; the roles' heads and losses
        read whole sequences)."""
        return dataclasses.replace(
            run, tensor_model_parallel_size=self.tensor_parallel, pipeline_model_parallel_size=1,
            virtual_pipeline_model_parallel_size=None, context_parallel_size=1,
            data_parallel_size=run.world_size // self.tensor_parallel, sequence_parallel=False)


def role_layout(placement: Optional[Placement], run: Layout
                ) -> tuple[Layout, Optional[ProcessGroupCollection]]:
    """The layout and process groups a role is built with: its placement's, or the run's (None:
    parallel_state's)."""
    if placement is None:
        return run, None
    return placement.layout(run), placement.groups
