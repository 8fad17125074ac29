"""Alignment stages on Megatron-Core: stage=rm (reward model), dpo, grpo and ppo.

Each is a `Task` that the training loop (llmtrain.train) asks for its model, its batches and
its step; everything else (parallel groups, optimizer, schedule, logging, checkpoints, resume,
preemption) is the training loop's own. Pure parts (records, rewards, advantages, losses) live
in llmtrain.rlhf.
"""

from __future__ import annotations

from typing import Optional

from llmtrain.config.schema import Config
from llmtrain.config.validate import Layout

STAGES = ("rm", "dpo", "grpo", "ppo")


def task_for(cfg: Config, layout: Layout, tokenizer, say) -> Optional["Task"]:
    """The stage's task, or None for language modelling (pretrain, sft)."""
    if cfg.stage.name in ("rm", "dpo"):
        from llmtrain.megatron.align.preference import PreferenceTask

        return PreferenceTask(cfg, layout, tokenizer, say)
    if cfg.stage.name in ("grpo", "ppo"):
        from llmtrain.megatron.align.rollout import RolloutTask

        return RolloutTask(cfg, layout, tokenizer, say)
    return None


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
