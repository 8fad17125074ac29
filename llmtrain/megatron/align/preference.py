"""stage=rm and stage=dpo: preference pairs through a reward model or a policy and its frozen
reference.

Each micro-batch holds micro_batch_size pairs, run as 2 x micro_batch_size rows (the chosen
replies, then the rejected ones) through Megatron's pipeline schedules. The reward model scores
each sequence by its head's value at its last token (Bradley-Terry loss); DPO compares the
replies' log-probabilities (the model's per-token cross entropy, exact under TP) with the
reference's, computed each step or once for the whole set before training; the reference-free
losses (SimPO, ORPO: llmtrain.rlhf.losses) load no reference at all.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state as ps

from llmtrain.megatron.align.heads import AdaptersOff, build_scalar_model, load_frozen, scores
from llmtrain.megatron.data import batches
from llmtrain.megatron.model import build_model
from llmtrain.megatron.step import train_step
from llmtrain.megatron.tasks import Task
from llmtrain.rlhf import losses
from llmtrain.rlhf.pairs import build_pair_dataset


def stat(total: torch.Tensor, count) -> torch.Tensor:
    """A [sum, count] report (the schedules sum reports over micro-batches)."""
    return torch.stack([total.detach().float().sum(),
                        torch.as_tensor(count, dtype=torch.float32, device=total.device)])


def rows(batch: dict, key: str) -> torch.Tensor:
    """[pairs, 2, ...] -> [2 x pairs, ...]: every chosen row, then every rejected row."""
    value = batch[key]
    return value.transpose(0, 1).reshape(-1, *value.shape[2:])


def model_inputs(batch: dict, device: str) -> tuple:
    tokens = rows(batch, "tokens").to(device)
    position_ids = rows(batch, "position_ids").to(device)
    mask = batch.get("attention_mask")
    return tokens, position_ids, None if mask is None else mask[:1].to(device)


def token_losses(model, batch: dict, device: str) -> torch.Tensor:
    """On the last pipeline stage, the cross entropy -log p(label) of every position,
    [rows, seq]; on the others, the hidden states the stage passes on, which the loss functions
    alone may turn into log-probabilities (negating them here negated the next stage's input)."""
    tokens, position_ids, mask = model_inputs(batch, device)
    return model(tokens, position_ids, mask, labels=rows(batch, "labels").to(device))


def sequence_logprobs(token_logp: torch.Tensor, loss_mask: torch.Tensor,
                      normalized: bool) -> torch.Tensor:
    total = (token_logp.float() * loss_mask).sum(dim=1)
    return total / loss_mask.sum(dim=1).clamp(min=1.0) if normalized else total


def reference_role(task: Task, model: list):
    """The frozen reference of a policy: the base with its adapters off under peft=lora, else
    stage.alignment.reference_load, else checkpoint.load, else the seed's initial weights."""
    if task.cfg.peft.name == "lora":
        return AdaptersOff(model)
    a = task.cfg.stage.alignment
    return load_frozen(task.cfg, task.layout, a.reference_load or task.cfg.checkpoint.load,
                       scalar=False, say=task.say,
                       placement=task.placement(a.reference_tensor_model_parallel_size))


def _logprob_forward(device, iterator, model):
    batch = next(iterator)
    output = token_losses(model, batch, device)

    def keep(token_loss):
        logp = -token_loss
        return logp.sum(), torch.tensor(1), {"lm loss": stat(logp.sum(), 1),
                                             "logp": logp.detach().float()}
    return output, keep


def token_logprobs(role, micro_batches: list[dict], schedule: dict) -> list:
    """A role's log-probability of every label of the micro-batches' rows ([rows, seq] each, on
    the last pipeline stage), without gradients."""
    return [r["logp"] for r in role.forward(micro_batches, schedule, _logprob_forward)]


class PreferenceTask(Task):
    reward_model = False  # a scalar head (stage=rm), else the policy itself (dpo)

    def __init__(self, cfg, layout, tokenizer, say):
        super().__init__(cfg, layout, tokenizer, say)
        self.align = cfg.stage.alignment
        self.loss = losses.PREFERENCE_LOSSES.get(self.align.loss_type)
        # Two rows per pair.
        self.schedule["micro_batch_size"] = 2 * cfg.stage.micro_batch_size
        self.reference = None
        self.precomputed = None  # {pair index: reference log-probs [2, seq]} on the last stage

    def build_model(self) -> list:
        return build_scalar_model(self.cfg, self.layout) if self.reward_model \
            else build_model(self.cfg, self.layout)

    def setup(self, model, start, save_dir) -> None:
        self.dataset, text = build_pair_dataset(self.cfg, self.tokenizer, self.layout.device)
        self.say(text)
        if self.reward_model:
            return
        if not self.loss.uses_reference:
            self.say(f"loss_type={self.align.loss_type} is reference-free: no reference model "
                     f"loaded")
            return
        self.reference = reference_role(self, model)
        if self.align.reference_logprobs == "precomputed":
            self._precompute()
            self.reference = None  # its memory goes back to training

    def batches(self, start: int) -> list:
        return [batches(self.dataset, self.cfg, self.layout, ps.get_data_parallel_rank(),
                        start * self.cfg.stage.global_batch_size)]

    # Reference log-probabilities.

    def _reference_logprobs(self, micro_batches: list[dict]) -> list:
        return token_logprobs(self.reference, micro_batches, self.schedule)

    def _precompute(self) -> None:
        """Reference log-probabilities of every training pair, once (the DP ranks share it)."""
        pairs, mbs = len(self.dataset.pairs), self.cfg.stage.micro_batch_size
        numbers = list(range(pairs)) + [pairs - 1] * (-pairs % mbs)
        micro = []
        for at in range(0, len(numbers), mbs):
            items = [self.dataset.item(n) for n in numbers[at:at + mbs]]
            micro.append(torch.utils.data.default_collate(items))
        self.precomputed = {}
        for batch, logp in zip(micro, self._reference_logprobs(micro)):
            for k, number in enumerate(batch["index"].tolist()):
                self.precomputed[number] = logp[[k, k + mbs]]
        self.say(f"reference log-probabilities of {pairs} pairs computed")

    def _attach_reference(self, micro_batches: list[dict]) -> None:
        """The reference's log-probabilities into the micro-batches of the last pipeline stage
        (every stage runs the reference's schedule: its activations pass through them)."""
        if self.precomputed is None:
            for batch, logp in zip(micro_batches, self._reference_logprobs(micro_batches)):
                batch["reference"] = logp
        elif ps.is_pipeline_last_stage(ignore_virtual=True):
            for batch in micro_batches:
                both = torch.stack([self.precomputed[int(n)] for n in batch["index"]])
                batch["reference"] = both.transpose(0, 1).reshape(-1, both.size(-1))

    # Steps.

    def _reward_forward(self, device, iterator, model):
        batch = next(iterator)
        tokens, position_ids, mask = model_inputs(batch, device)
        output = model(tokens, position_ids, mask, output_processor=scores(model))
        return output, partial(self._reward_loss, rows(batch, "last").to(device))

    @staticmethod
    def _reward_loss(last: torch.Tensor, values: torch.Tensor):
        scores = values.gather(1, last[:, None])[:, 0]
        pairs = scores.size(0) // 2
        chosen, rejected = scores[:pairs], scores[pairs:]
        loss = losses.bradley_terry(chosen, rejected)
        return loss.sum(), torch.tensor(pairs), {
            "lm loss": stat(loss, pairs),
            "metric/accuracy": stat((chosen > rejected).float(), pairs),
            "metric/margin": stat(chosen - rejected, pairs),
            "metric/reward_chosen": stat(chosen, pairs),
            "metric/reward_rejected": stat(rejected, pairs)}

    def _dpo_forward(self, device, iterator, model):
        batch = next(iterator)
        output = token_losses(model, batch, device)
        loss_mask = rows(batch, "loss_mask").to(device)
        return output, partial(self._dpo_loss, loss_mask, batch.get("reference"))

    def _dpo_loss(self, loss_mask: torch.Tensor, reference, token_loss: torch.Tensor):
        a = self.align
        logp = -token_loss
        normalized = a.length_normalized or self.loss.length_normalized
        policy_seq = sequence_logprobs(logp, loss_mask, normalized)
        # Reference-free losses: the implicit rewards are beta x the policy's log-probabilities.
        reference_seq = torch.zeros_like(policy_seq) if reference is None else \
            sequence_logprobs(reference.to(logp.device), loss_mask, normalized)
        pairs = logp.size(0) // 2
        loss = losses.preference(policy_seq[:pairs], policy_seq[pairs:], reference_seq[:pairs],
                                 reference_seq[pairs:], a)
        rewards = a.beta * (policy_seq - reference_seq).detach()
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        metrics = {
            "lm loss": stat(loss, pairs),
            "metric/accuracy": stat((chosen > rejected).float(), pairs),
            "metric/margin": stat(chosen - rejected, pairs),
            "metric/reward_chosen": stat(chosen, pairs),
            "metric/reward_rejected": stat(rejected, pairs),
            "metric/logp_chosen": stat(policy_seq[:pairs].detach(), pairs)}
        if reference is not None:
            kl = losses.kl_estimate(logp.detach().float(), reference.to(logp.device)) * loss_mask
            metrics["metric/kl"] = stat(kl, loss_mask.sum())
        return loss.sum(), torch.tensor(pairs), metrics

    def step(self, iteration, model, optimizer, scheduler, iterators, guard):
        micro_batches = [next(iterators[0]) for _ in range(self.layout.num_microbatches)]
        if not self.reward_model and self.loss.uses_reference:
            self._attach_reference(micro_batches)
        forward = self._reward_forward if self.reward_model else self._dpo_forward
        return train_step(model, optimizer, scheduler, [iter(micro_batches) for _ in model],
                          **self.schedule, guard=guard, forward=forward)


class RewardModelTask(PreferenceTask):
    """stage=rm."""

    reward_model = True


class PolicyPreferenceTask(PreferenceTask):
    """stage=dpo (loss_type sigmoid, ipo, simpo, orpo)."""
