"""Roles on servers of their own (llmtrain.rlhf.remote): one rank asks, the others get its
answer, and a server's failure stops every rank together, with the server's words."""

from __future__ import annotations

from typing import Callable

import torch.distributed as dist

from llmtrain.errors import RunStopped
from llmtrain.rlhf.remote import RoleServerError


def from_server(ask: Callable, source: int, group=None):
    """`ask()` on global rank `source`; its answer on every rank of `group` (default: the
    world). Where other groups ask servers of their own at the same time, every rank learns of
    any group's failure, so that none waits for a peer that stopped."""
    answer = failure = None
    if dist.get_rank() == source:
        try:
            answer = ask()
        except RoleServerError as error:
            failure = str(error)
    box = [(answer, failure)]
    dist.broadcast_object_list(box, src=source, group=group)
    answer, failure = box[0]
    if group is not None:
        failures = [None] * dist.get_world_size()
        dist.all_gather_object(failures, failure)
        failure = next((f for f in failures if f), None)
    if failure:
        raise RunStopped(failure)
    return answer
