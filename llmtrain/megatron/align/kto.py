"""stage=kto: Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired examples.

Each step first runs, without gradients, the frozen reference over both rows of every sample
(the example, and its prompt with another example's completion: llmtrain.rlhf.unpaired) and the
policy over the mismatched rows; the mean log-ratio of the mismatched rows over the step's whole
batch (every micro-batch and data-parallel replica), at least 0 and detached, is the reference
point z0. The training pass then runs the examples alone, each desirable one pulled above z0 and
each undesirable one pushed below it (llmtrain.rlhf.losses.kto).
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state as ps

from llmtrain.megatron.align.heads import Role
from llmtrain.megatron.align.preference import (reference_role, rows, sequence_logprobs, stat,
                                                token_logprobs, token_losses)
from llmtrain.megatron.data import batches
from llmtrain.megatron.model import build_model
from llmtrain.megatron.step import train_step
from llmtrain.megatron.tasks import Task
from llmtrain.rlhf import losses
from llmtrain.rlhf.unpaired import build_unpaired_dataset

ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def _row(batch: dict, k: int) -> dict:
    """The micro-batch of row k of each sample (0: the examples, 1: the mismatched rows)."""
    out = {key: batch[key][:, k:k + 1] for key in ROW_KEYS}
    out["desirable"] = batch["desirable"]
    if "attention_mask" in batch:
        out["attention_mask"] = batch["attention_mask"]
    return out


class KTOTask(Task):
    """stage=kto."""

    def __init__(self, cfg, layout, tokenizer, say):
        super().__init__(cfg, layout, tokenizer, say)
        self.align = cfg.stage.alignment

    def build_model(self) -> list:
        return build_model(self.cfg, self.layout)

    def setup(self, model, start, save_dir) -> None:
        self.dataset, text = build_unpaired_dataset(self.cfg, self.tokenizer, self.layout.device)
        self.say(text)
        self.reference = reference_role(self, model)

    def batches(self, start: int) -> list:
        return [batches(self.dataset, self.cfg, self.layout, ps.get_data_parallel_rank(),
                        start * self.cfg.stage.global_batch_size)]

    def _attach_reference(self, micro: list[dict], examples: list[dict], model: list) -> None:
        """Into each micro-batch of examples on the last pipeline stage: the reference's
        log-probabilities of its completions and the step's reference point."""
        both = {**self.schedule, "micro_batch_size": 2 * self.cfg.stage.micro_batch_size}
        reference = token_logprobs(self.reference, micro, both)
        policy = token_logprobs(Role(model), [_row(b, 1) for b in micro], self.schedule)
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return
        normalized, total = self.align.length_normalized, 0.0
        for batch, example, ref, pol in zip(micro, examples, reference, policy):
            mask = rows(batch, "loss_mask").to(ref.device)
            ref_seq = sequence_logprobs(ref, mask, normalized)
            n = ref_seq.size(0) // 2
            example["reference"] = ref_seq[:n]
            total = total + (sequence_logprobs(pol, mask[n:], normalized) - ref_seq[n:]).sum()
        mbs = self.cfg.stage.micro_batch_size
        sums = torch.stack([total, torch.tensor(float(mbs * len(micro)), device=total.device)])
        torch.distributed.all_reduce(sums, group=ps.get_data_parallel_group(
            with_context_parallel=True))
        point = losses.kto_reference_point(sums[0], sums[1])
        for example in examples:
            example["reference_point"] = point

    def _forward(self, device, iterator, model):
        batch = next(iterator)
        return token_losses(model, batch, device), partial(self._loss, batch, device)

    def _loss(self, batch: dict, device: str, token_loss: torch.Tensor):
        a = self.align
        mask = rows(batch, "loss_mask").to(device)
        policy = sequence_logprobs(-token_loss, mask, a.length_normalized)
        reference, point = batch["reference"], batch["reference_point"]
        desirable = batch["desirable"].to(device)
        loss = losses.kto(policy, reference, desirable, point, a)
        n = policy.size(0)
        good = desirable.float()
        bad = 1.0 - good
        rewards = a.beta * (policy - reference).detach()
        return loss.sum(), torch.tensor(n), {
            "lm loss": stat(loss, n),
            "metric/kl": stat(point.expand(n), n),
            "metric/reward_desirable": stat(rewards * good, good.sum()),
            "metric/reward_undesirable": stat(rewards * bad, bad.sum()),
            "metric/logp_desirable": stat(policy.detach() * good, good.sum()),
            "metric/logp_undesirable": stat(policy.detach() * bad, bad.sum())}

    def step(self, iteration, model, optimizer, scheduler, iterators, guard):
        micro = [next(iterators[0]) for _ in range(self.layout.num_microbatches)]
        examples = [_row(b, 0) for b in micro]
        self._attach_reference(micro, examples, model)
        return train_step(model, optimizer, scheduler, [iter(examples) for _ in model],
                          **self.schedule, guard=guard, forward=self._forward)
