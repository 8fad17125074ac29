"""stage=grpo and stage=ppo: sample replies with the inference engine, score them, and train the
policy on them with a clipped surrogate.

One step: the prompts of the step (global_batch_size / group_size of them, in a per-epoch
shuffled order: a resumed run continues with the same prompts) each get group_size replies from
Megatron-Core's inference machinery (llmtrain.megatron.inference.Engine, run on the trained
model itself, so no weights are copied); rewards come from rules (llmtrain.rlhf.rewards), a
frozen reward model, or the user's reward server (llmtrain.rlhf.remote). The policy's and the
reference's log-probabilities (and for PPO the critic's values) are computed once, then the
policy (and the critic) take ppo_epochs optimizer steps on the batch through the training loop's
own step (llmtrain.megatron.step).

Roles: actor = the trained model (its checkpoints are the run's), reference and reward model
frozen, critic (PPO) a value-head model trained in step with the actor, with its own optimizer
and checkpoints (<save>/critic; llmtrain.megatron.align.critic). By default all are colocated:
every rank holds its TP x PP share of each. The roles beside the actor may take a
tensor-parallel layout of their own (llmtrain.megatron.align.placement), and the reward, the
reference and the critic may run on servers of their own (llmtrain.rlhf.remote).
With data parallelism each replica takes its share of the step's prompts (whole groups), makes
and scores their rollouts on its own, and the replicas meet in the gradient reduction.
"""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from llmtrain.data import chat
from llmtrain.data.sources import DataError
from llmtrain.generate.sequence import Sampling, Sequence
from llmtrain.megatron import checkpoint
from llmtrain.megatron.align import Task
from llmtrain.megatron.align.critic import Critic, ServedCritic
from llmtrain.megatron.align.heads import (
    Role,
    causal_inputs,
    load_frozen,
    model_inputs,
    score_forward,
)
from llmtrain.megatron.align.servers import from_server
from llmtrain.megatron.inference import make_engine
from llmtrain.megatron.model import build_model
from llmtrain.megatron.step import StepResult, train_step
from llmtrain.rlhf import advantages, losses
from llmtrain.rlhf.pairs import pad_id
from llmtrain.rlhf.records import encode_prompts
from llmtrain.rlhf.remote import remote_logprobs, remote_rewards
from llmtrain.rlhf.rewards import reward


def _stat(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.stack([(values.detach().float() * mask).sum(), mask.sum().float()])


@torch.no_grad()
def vocab_parallel_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax over a vocabulary split across tensor-parallel ranks."""
    group = ps.get_tensor_model_parallel_group()
    top = logits.max(dim=-1, keepdim=True).values
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    exp = (logits - top).exp()
    total = exp.sum(dim=-1, keepdim=True)
    dist.all_reduce(total, group=group)
    expected = (exp * logits).sum(dim=-1) / total.squeeze(-1)
    dist.all_reduce(expected, group=group)
    return top.squeeze(-1) + total.log().squeeze(-1) - expected


def _pick(reports: list[dict], key: str) -> list:
    return [r[key] for r in reports]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor, tp_group=None) -> torch.Tensor:
    """log p(label) from vocabulary-parallel logits [b, s, v/tp] (split over `tp_group`, by
    default the run's)."""
    return -vocab_parallel_cross_entropy(logits.float().transpose(0, 1).contiguous(),
                                         labels.transpose(0, 1).contiguous(),
                                         tp_group=tp_group).transpose(0, 1)


def _keep_tokens(replies: list, i: int, output) -> None:
    replies[i] = output.tokens


class RolloutTask(Task):
    def __init__(self, cfg, layout, tokenizer, say):
        super().__init__(cfg, layout, tokenizer, say)
        self.ppo = cfg.stage.name == "ppo"
        self.align = cfg.stage.alignment
        self.prompts_per_step = cfg.stage.global_batch_size // self.align.group_size
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.critic = None  # ppo: a Critic, or a ServedCritic
        self._order = (-1, None)  # (epoch, prompt order)

    def build_model(self) -> list:
        return build_model(self.cfg, self.layout)

    # Roles and data.

    def setup(self, model, start, save_dir) -> None:
        cfg, a = self.cfg, self.align
        template = chat.load_template(cfg.data.sft.chat_template, self.tokenizer)
        prompts, self.stop_ids = encode_prompts([str(e) for e in cfg.data.data_path], template,
                                                self.tokenizer, cfg.data.sft.system)
        room = cfg.data.seq_length - a.max_new_tokens
        self.prompts = [p for p in prompts if len(p.ids) <= room]
        if not self.prompts:
            raise DataError(f"no prompt fits in data.seq_length={cfg.data.seq_length} with "
                             f"max_new_tokens={a.max_new_tokens}: raise data.seq_length")
        left_out = len(prompts) - len(self.prompts)
        self.say(f"prompt data: {len(prompts)} prompts"
                 + (f", {left_out} longer than seq_length - max_new_tokens left out"
                    if left_out else ""))
        source = a.reference_load or cfg.checkpoint.load
        self.reference = None if a.reference_url else load_frozen(
            cfg, self.layout, source, scalar=False, say=self.say,
            placement=self.placement(a.reference_tensor_model_parallel_size))
        if a.reference_url:
            self.say(f"reference: served at {a.reference_url}")
        self.scorer = load_frozen(
            cfg, self.layout, a.reward_load, scalar=True, say=self.say,
            placement=self.placement(a.reward_tensor_model_parallel_size),
        ) if a.reward == "model" else None
        if self.ppo:
            self._setup_critic(start, save_dir)
        self.engine = make_engine(checkpoint.unwrap(model[0]), cfg.model.vocab_size,
                                  a.generation_batch_size or cfg.stage.global_batch_size,
                                  cfg.data.seq_length, self.layout.device, cfg.seed)
        self.say(f"rollouts: {self.engine.description}")

    def _setup_critic(self, start: int, save_dir) -> None:
        a = self.align
        if a.critic_url:
            self.critic = ServedCritic(a.critic_url, a.server_timeout, start, self.say)
            return
        self.critic = Critic(self.cfg, self.layout, self.tokenizer, start,
                             save_dir / "critic" if save_dir else None,
                             self.placement(a.critic_tensor_model_parallel_size),
                             lambda text: self.say(f"critic: {text}"))

    def batches(self, start: int) -> list:
        return [None]  # rollouts are made in `step`, from the step's own prompts

    def save(self, iteration: int, blocking: bool) -> None:
        if self.critic is not None:
            self.critic.save(iteration, blocking)

    def poll(self) -> None:
        if self.critic is not None:
            self.critic.poll()

    def saving(self) -> bool:
        return self.critic is not None and self.critic.saving()

    def wait(self) -> None:
        if self.critic is not None:
            self.critic.wait()

    # Rollouts.

    def _step_prompts(self, iteration: int) -> list:
        count, chosen = len(self.prompts), []
        for position in range((iteration - 1) * self.prompts_per_step,
                              iteration * self.prompts_per_step):
            epoch, k = divmod(position, count)
            if self._order[0] != epoch:
                self._order = (epoch, np.random.default_rng([self.cfg.seed, epoch]
                                                            ).permutation(count))
            chosen.append(self.prompts[int(self._order[1][k])])
        return chosen

    def _generate(self, iteration: int, model: list) -> list[tuple]:
        """(prompt, reply tokens) of this replica's sequences of the step, on its every rank."""
        a = self.align
        share = self.prompts_per_step // self.dp_size
        mine = self._step_prompts(iteration)[self.dp_rank * share:(self.dp_rank + 1) * share]
        prompts = [p for p in mine for _ in range(a.group_size)]
        sampling = Sampling(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
        sequences = [Sequence(p.ids, a.max_new_tokens, sampling, tuple(self.stop_ids))
                     for p in prompts]
        if self.cfg.parallel.overlap_param_gather:
            # The last step's weights are gathered by the next forward's hooks, which the
            # decode engine (it reads the tensors directly) does not run: gather them now.
            for chunk in model:
                chunk.start_param_sync(force_sync=True)
        self.engine.generator.manual_seed(self.cfg.seed * 100003 + iteration
                                          + 7919 * self.dp_rank)
        replies = None
        if self.engine.is_driver:
            replies = [None] * len(sequences)
            for i, s in enumerate(sequences):
                self.engine.add(s, None, partial(_keep_tokens, replies, i))
            while self.engine.busy:
                self.engine.advance()
            self.engine.stop_followers()
        else:
            self.engine.follow()
        box = [replies]
        dist.broadcast_object_list(box, src=self.engine.driver, group=self.engine.group)
        # Megatron caches rotary tables made under inference mode, which training cannot use.
        RotaryEmbedding.forward.cache_clear()
        for chunk in model:
            chunk.train()
        return list(zip(prompts, box[0]))

    def _experience(self, rollouts: list[tuple]) -> tuple[list[dict], torch.Tensor]:
        """Micro-batches of the rollouts (tokens, labels, reply mask) and their scores (of a
        reward model: on its last pipeline stage)."""
        s, device = self.cfg.data.seq_length, self.layout.device
        n, pad = len(rollouts), pad_id(self.tokenizer)
        tokens = torch.full((n, s), pad, dtype=torch.long)
        labels = torch.full((n, s), pad, dtype=torch.long)
        mask = torch.zeros((n, s))
        last = torch.zeros(n, dtype=torch.long)  # where the reward model scores: the last label
        scores = torch.zeros(n)
        for row, (prompt, reply) in enumerate(rollouts):
            full = torch.tensor(prompt.ids + reply)
            length = len(full) - 1
            tokens[row, :length], labels[row, :length] = full[:-1], full[1:]
            mask[row, len(prompt.ids) - 1:length] = 1.0
            last[row] = length - 1
            if self.align.reward == "rule":
                scores[row] = reward(self._reply_text(reply), prompt.answer,
                                     self.align.reward_weights, self.align.answer_pattern,
                                     self.align.format_pattern)
        if self.align.reward == "remote":
            scores = self._remote_scores(rollouts)
        mbs = self.cfg.stage.micro_batch_size
        shared = causal_inputs(mbs, s, device)
        micro = [{"tokens": tokens[i:i + mbs], "labels": labels[i:i + mbs],
                  "mask": mask[i:i + mbs], "last": last[i:i + mbs], **shared}
                 for i in range(0, n, mbs)]
        if self.scorer is not None:
            scored = _pick(self.scorer.forward(micro, self.schedule, score_forward),
                           "score")
            scores = torch.cat(scored).cpu() if scored else scores
        return micro, scores

    def _reply_text(self, reply: list[int]) -> str:
        return self.tokenizer.decode([t for t in reply if t not in self.stop_ids])

    def _from_server(self, ask):
        """`ask()` of a role's server, once per replica by the engine's driver; its answer on
        the replica's every rank."""
        return from_server(ask, self.engine.driver, self.engine.group)

    def _remote_scores(self, rollouts: list[tuple]) -> torch.Tensor:
        a = self.align
        return torch.tensor(self._from_server(lambda: remote_rewards(
            a.reward_url, [self.tokenizer.decode(prompt.ids) for prompt, _ in rollouts],
            [self._reply_text(reply) for _, reply in rollouts],
            [prompt.answer for prompt, _ in rollouts], a.server_timeout,
            [(prompt.ids + reply)[:-1] for prompt, reply in rollouts])))

    def _remote_reference(self, rollouts: list[tuple]) -> list[torch.Tensor]:
        """The served reference's log-probability of every label, per micro-batch [mbs, seq]
        (zeros past each sequence, as the mask leaves them)."""
        a = self.align
        sequences = [prompt.ids + reply for prompt, reply in rollouts]
        values = self._from_server(lambda: remote_logprobs(a.reference_url, sequences,
                                                            a.server_timeout))
        table = torch.zeros(len(sequences), self.cfg.data.seq_length)
        for row, logp in enumerate(values):
            table[row, :len(logp)] = torch.tensor(logp)
        mbs = self.cfg.stage.micro_batch_size
        return [table[at:at + mbs].to(self.layout.device) for at in range(0, len(table), mbs)]

    # Forward steps.

    def _logprob_forward(self, device, iterator, model):
        batch = next(iterator)
        logits = model(*model_inputs(batch, device))
        labels = batch["labels"].to(device)
        group = checkpoint.unwrap(model).tp_group  # the role's own, or the run's

        def keep(output):
            logp = token_logprobs(output, labels, group)
            return logp.sum(), torch.tensor(1), {"lm loss": torch.zeros(2), "logp": logp}
        return logits, keep

    def _policy_forward(self, device, iterator, model):
        batch = next(iterator)
        logits = model(*model_inputs(batch, device))
        return logits, partial(self._policy_loss, batch, device)

    def _policy_loss(self, batch: dict, device: str, logits: torch.Tensor):
        a = self.align
        mask = batch["mask"].to(device)
        logp = token_logprobs(logits, batch["labels"].to(device))
        surrogate, clipped = losses.clipped_policy(logp, batch["old_logp"], batch["advantages"],
                                                   a.clip_range)
        kl = losses.kl_estimate(logp, batch["reference_logp"])
        per_token = surrogate + (a.kl_coef * kl if not self.ppo else 0.0)
        entropy = vocab_parallel_entropy(logits.detach().float())
        tokens = mask.sum()
        return (per_token * mask).sum(), tokens.to(torch.int), {
            "lm loss": _stat(per_token, mask), "metric/kl": _stat(kl, mask),
            "metric/entropy": _stat(entropy, mask), "metric/clipfrac": _stat(clipped, mask)}

    # The step.

    def step(self, iteration, model, optimizer, scheduler, iterators, guard):
        a = self.align
        clock = [self._now()]
        rollouts = self._generate(iteration, model)
        clock.append(self._now())
        micro, scores = self._experience(rollouts)
        clock.append(self._now())
        # Collected on the last pipeline stage, the one that computes the losses.
        old = _pick(Role(model).forward(micro, self.schedule, self._logprob_forward), "logp")
        ref = self._remote_reference(rollouts) if self.align.reference_url else \
            _pick(self.reference.forward(micro, self.schedule, self._logprob_forward), "logp")
        values = self.critic.values(micro, self.schedule) if self.ppo else None
        if self.last_stage:
            self._advantages(micro, scores, old, ref, values)
        clock.append(self._now())
        result = StepResult(None, 0)
        for _ in range(a.ppo_epochs):
            result = train_step(model, optimizer, scheduler, [iter(micro)], **self.schedule,
                                guard=guard, forward=self._policy_forward)
            if self.ppo:
                value_loss = self.critic.train(micro, self.schedule)
                if value_loss is not None:
                    result.metrics["value_loss"] = value_loss
        # Means over every replica's rollouts.
        totals = torch.tensor([float(scores.sum()), float(sum(len(r) for _, r in rollouts)),
                               float(len(rollouts))], device=self.layout.device)
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
        result.metrics.update(reward=float(totals[0] / totals[2]),
                              reply_length=float(totals[1] / totals[2]))
        clock.append(self._now())
        # Where the step's time goes (this rank's clock): generation, scoring, log-probabilities
        # (old, reference and values), the update; and the rollout's tokens/s (this replica's).
        for name, began, ended in zip(("rollout", "reward", "logprobs", "update"), clock,
                                      clock[1:]):
            result.metrics[f"seconds_{name}"] = ended - began
        result.metrics["rollout_tokens_per_second"] = \
            sum(len(r) for _, r in rollouts) / max(clock[1] - clock[0], 1e-9)
        return result

    def _now(self) -> float:
        if self.layout.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _advantages(self, micro, scores, old, ref, values) -> None:
        """Advantages (and for PPO returns) of every reply token, into the micro-batches."""
        a = self.align
        device = old[0].device
        mask = torch.cat([b["mask"] for b in micro]).to(device)
        old_logp, ref_logp = torch.cat(old), torch.cat(ref)
        if values is None:  # GRPO: each reply's group-normalised reward on all its tokens
            adv = advantages.group_normalized(scores.to(device), a.group_size)[:, None] * mask
            returns = old_values = None
        else:  # PPO: the score at the last reply token, a KL penalty on every one, GAE
            old_values = torch.cat(values).float() * mask
            rewards = -a.kl_coef * (old_logp - ref_logp) * mask
            last = mask.size(1) - 1 - mask.flip(1).argmax(dim=1)
            rewards[torch.arange(mask.size(0)), last] += scores.to(device)
            adv, returns = advantages.gae(rewards, old_values, mask, a.gamma, a.lam)
            adv = advantages.whiten(adv, mask)
        mbs = self.cfg.stage.micro_batch_size
        for k, batch in enumerate(micro):
            rows = slice(k * mbs, (k + 1) * mbs)
            batch.update(old_logp=old_logp[rows], reference_logp=ref_logp[rows],
                         advantages=adv[rows])
            if values is not None:
                batch.update(old_values=old_values[rows], returns=returns[rows])
