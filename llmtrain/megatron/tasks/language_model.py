"""stage=pretrain and stage=sft: next-token prediction on the data.kind's dataset, with
evaluation on its validation split."""

from __future__ import annotations

from pathlib import Path

from llmtrain.megatron import parallel
from llmtrain.megatron.data import batches, build_datasets
from llmtrain.megatron.model import build_model
from llmtrain.megatron.step import train_step
from llmtrain.megatron.tasks import Task


class LanguageModelTask(Task):
    def build_model(self) -> list:
        return build_model(self.cfg, self.layout)

    def setup(self, model, start, save_dir) -> None:
        cache = Path(self.cfg.output_dir) / "data_cache"
        self.chunks = len(model)
        self.train_data, self.valid_data = build_datasets(self.cfg, self.layout, self.tokenizer,
                                                          str(cache))
        self.dp_rank = parallel.data_parallel_rank()

    def _iterators(self, dataset, consumed: int) -> list:
        # One iterator per virtual pipeline chunk, each yielding the same micro-batches.
        return [batches(dataset, self.cfg, self.layout, self.dp_rank, consumed)
                for _ in range(self.chunks)]

    def batches(self, start: int) -> list:
        return self._iterators(self.train_data, start * self.cfg.stage.global_batch_size)

    def validation_batches(self, start: int) -> list:
        stage = self.cfg.stage
        evals_done = start // stage.eval_interval if stage.eval_interval else 0
        return self._iterators(self.valid_data,
                               evals_done * stage.eval_iters * stage.global_batch_size)

    def step(self, iteration, model, optimizer, scheduler, iterators, guard):
        return train_step(model, optimizer, scheduler, iterators, **self.schedule, guard=guard)
