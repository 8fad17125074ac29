"""One model replica (its TP x PP ranks) that runs work collectively: one rank, the driver (last
pipeline stage, first TP rank: the one that holds the whole logits), takes batches from users and
hands each to the replica's other ranks, which follow until it stops them. The generation engine
and the reward model's Scorer share it."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

_STOP = "stop"  # what the driver sends followers when it is done


def _driver_rank(group) -> int:
    """The global rank of this replica's last pipeline stage's first TP rank."""
    mine = (ps.is_pipeline_last_stage(ignore_virtual=True)
            and ps.get_tensor_model_parallel_rank() == 0)
    flags = [None] * dist.get_world_size(group)
    dist.all_gather_object(flags, mine, group=group)
    return dist.get_global_rank(group, flags.index(True))


class Replica:
    """One model replica (its TP x PP ranks; or every rank of `group`) that runs batches
    collectively: the driver takes them and hands each to the other ranks, which follow until it
    stops them."""

    def __init__(self, device: str, group=None):
        self.group = group or ps.get_model_parallel_group()
        self.device = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" \
            else torch.device("cpu")
        self.driver = _driver_rank(self.group)
        self.is_driver = dist.get_rank() == self.driver

    def _run_batch(self, batch):
        """Every rank: run one batch (what `follow` does with each the driver sends)."""
        raise NotImplementedError

    def follow(self) -> None:
        """Other ranks: run every batch the driver sends, until it stops."""
        while True:
            batch = self._broadcast_object(None)
            if batch == _STOP:
                return
            self._run_batch(batch)

    def stop_followers(self) -> None:
        """Driver: release the ranks waiting in `follow`."""
        self._broadcast_object(_STOP)

    def _broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=self.driver, group=self.group)
        return box[0]
