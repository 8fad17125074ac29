"""Every stage is a `Task` (llmtrain.tasks registers them, by name, with their data and
checks) that the training loop (llmtrain.train) asks for its model, its batches and its step;
everything else (parallel groups, optimizer, schedule, logging, checkpoints, resume,
preemption) is the training loop's own. Language modelling (pretrain, sft) is
llmtrain.megatron.tasks.language_model; the alignment stages are llmtrain.megatron.align.
"""

from __future__ import annotations

import importlib
from typing import Optional

from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config
from llmtrain.tasks import task_spec


def task_for(cfg: Config, layout: Layout, tokenizer, say) -> "Task":
    """The task of cfg.stage.name, from the stage registry."""
    module, name = task_spec(cfg.stage.name).implementation.split(":")
    return getattr(importlib.import_module(module), name)(cfg, layout, tokenizer, say)


class Task:
    """What a stage trains and how one of its steps runs."""

    def __init__(self, cfg: Config, layout: Layout, tokenizer, say):
        self.cfg, self.layout, self.tokenizer, self.say = cfg, layout, tokenizer, say
        self.schedule = dict(num_microbatches=layout.num_microbatches,
                             seq_length=cfg.data.seq_length,
                             micro_batch_size=cfg.stage.micro_batch_size, device=layout.device)
        self._placements = {}

    def placement(self, tensor_parallel: Optional[int]):
        """A role's own layout of that tensor-parallel size (None: the run's); roles of one size
        share its process groups (made collectively, the first time)."""
        if tensor_parallel is None:
            return None
        if tensor_parallel not in self._placements:
            from llmtrain.megatron.align.placement import Placement

            self._placements[tensor_parallel] = Placement(tensor_parallel)
        return self._placements[tensor_parallel]

    def build_model(self) -> list:
        """This rank's chunks of the trained model."""
        raise NotImplementedError

    def setup(self, model: list, start: int, save_dir) -> None:
        """After the trained model is restored: the other roles, and their own checkpoints."""

    def batches(self, start: int) -> list:
        """Data iterators (one per virtual pipeline chunk) from step `start + 1` on."""
        raise NotImplementedError

    def validation_batches(self, start: int) -> list:
        """Validation iterators (one per virtual pipeline chunk) after `start` steps; [None]:
        the stage has no evaluation pass."""
        return [None]

    def step(self, iteration: int, model: list, optimizer, scheduler, iterators: list, guard):
        """One training step: a StepResult with the stage's metrics."""
        raise NotImplementedError

    def save(self, iteration: int, blocking: bool) -> None:
        """Save the other trained roles with the trained model's step."""

    def poll(self) -> None:
        """At a step boundary (collective): commit the other roles' background saves whose
        writers finished."""

    def saving(self) -> bool:
        """Whether a background save of another role is still uncommitted (the trained model's
        commit of the same step waits for it)."""
        return False

    def wait(self) -> None:
        """Finish the other roles' background saves."""
