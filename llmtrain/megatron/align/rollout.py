"""stage=grpo and stage=ppo: sample replies with the inference engine, score them, and train the
policy on them with a clipped surrogate.

One step: the prompts of the step (global_batch_size / group_size of them, in a per-epoch
shuffled order: a resumed run continues with the same prompts) each get group_size replies from
the inference engine (llmtrain.megatron.inference.make_engine: the decode engine, or
Megatron-Core's for what it does not cover), run on the trained model itself, so no weights are
copied; rewards come from rules (llmtrain.rlhf.rewards), a frozen reward model, the user's
reward server (llmtrain.rlhf.remote), or a weighted sum of rules and those scores
(reward=combined); with filter_groups (DAPO's dynamic sampling) groups whose replies all score
the same are replaced by groups for further prompts. The policy's and the reference's
log-probabilities (and for PPO the critic's
values) are computed once, then the advantages (stage.alignment.advantage_estimator), and the
policy (and the critic) take ppo_epochs optimizer steps on the batch through the training loop's
own step (llmtrain.megatron.step), with the policy loss and aggregation the config names
(llmtrain.rlhf.losses).

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
from llmtrain.generate.sequence import Sampling, Sequence, run_all
from llmtrain.megatron import checkpoint
from llmtrain.megatron.align.critic import Critic, ServedCritic
from llmtrain.megatron.align.heads import (
    AdaptersOff,
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
from llmtrain.megatron.tasks import Task
from llmtrain.rlhf import losses
from llmtrain.rlhf.advantages import ESTIMATORS
from llmtrain.rlhf.pairs import pad_id
from llmtrain.rlhf.records import encode_prompts
from llmtrain.rlhf.remote import remote_logprobs, remote_rewards
from llmtrain.rlhf.rewards import RULES, overlong_penalty, weighted_sum, weights
from llmtrain.tasks import task_spec


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


class RolloutTask(Task):
    def __init__(self, cfg, layout, tokenizer, say):
        super().__init__(cfg, layout, tokenizer, say)
        self.uses_critic = "critic" in task_spec(cfg.stage.name).roles(cfg)
        self.align = cfg.stage.alignment
        self.prompts_per_step = cfg.stage.global_batch_size // self.align.group_size
        self.dp_rank = ps.get_data_parallel_rank()
        self.dp_size = ps.get_data_parallel_world_size()
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        self.critic = None  # ppo: a Critic, or a ServedCritic
        self.parts = list(weights(self.align))  # the reward's parts: rules, model, remote
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
        self.reference = None if a.reference_url else AdaptersOff(model) \
            if cfg.peft.name == "lora" else load_frozen(
                cfg, self.layout, source, scalar=False, say=self.say,
                placement=self.placement(a.reference_tensor_model_parallel_size))
        if a.reference_url:
            self.say(f"reference: served at {a.reference_url}")
        self.scorer = load_frozen(
            cfg, self.layout, a.reward_load, scalar=True, say=self.say,
            placement=self.placement(a.reward_tensor_model_parallel_size),
        ) if "model" in self.parts else None
        if self.uses_critic:
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

    def _extra_prompts(self, iteration: int, round_: int, count: int) -> list:
        """Dynamic sampling's further prompts of a step (round_ >= 1), this replica's: drawn
        from the seed, the step and the round, so that a resumed run draws the same."""
        rng = np.random.default_rng([self.cfg.seed, iteration, round_, self.dp_rank])
        picks = rng.choice(len(self.prompts), count, replace=count > len(self.prompts))
        return [self.prompts[int(k)] for k in picks]

    def _generate(self, iteration: int, model: list, mine: list, round_: int = 0
                  ) -> list[tuple]:
        """(prompt, reply tokens) of group_size replies to each of `mine` (this replica's
        prompts), on the replica's every rank."""
        a = self.align
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
                                          + 7919 * self.dp_rank + 104729 * round_)
        replies = None
        if self.engine.is_driver:
            replies = [output.tokens for output in run_all(self.engine, sequences)]
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
        """Micro-batches of the rollouts and their scores (`_scores`; of a reward model: on its
        last pipeline stage)."""
        micro = self._micro_batches(rollouts)
        return micro, self._scores(rollouts, micro)

    def _micro_batches(self, rollouts: list[tuple]) -> list[dict]:
        """The rollouts as micro-batches: tokens, labels, reply mask, last label."""
        s, device = self.cfg.data.seq_length, self.layout.device
        n, pad = len(rollouts), pad_id(self.tokenizer)
        tokens = torch.full((n, s), pad, dtype=torch.long)
        labels = torch.full((n, s), pad, dtype=torch.long)
        mask = torch.zeros((n, s))
        last = torch.zeros(n, dtype=torch.long)  # where the reward model scores: the last label
        for row, (prompt, reply) in enumerate(rollouts):
            full = torch.tensor(prompt.ids + reply)
            length = len(full) - 1
            tokens[row, :length], labels[row, :length] = full[:-1], full[1:]
            mask[row, len(prompt.ids) - 1:length] = 1.0
            last[row] = length - 1
        mbs = self.cfg.stage.micro_batch_size
        shared = causal_inputs(mbs, s, device)
        return [{"tokens": tokens[i:i + mbs], "labels": labels[i:i + mbs],
                 "mask": mask[i:i + mbs], "last": last[i:i + mbs], **shared}
                for i in range(0, n, mbs)]

    def _scores(self, rollouts: list[tuple], micro: list[dict]) -> torch.Tensor:
        """[rollouts, 1 + parts]: the reward (the weighted sum of its parts, with DAPO's
        overlong shaping), then each part's own score (self.parts: rules, the reward model's,
        the server's)."""
        a, n = self.align, len(rollouts)
        parts = self._rule_scores(rollouts)
        if "remote" in self.parts:
            parts["remote"] = self._remote_scores(rollouts)
        if self.scorer is not None:
            scored = _pick(self.scorer.forward(micro, self.schedule, score_forward), "score")
            parts["model"] = torch.cat(scored).cpu() if scored else torch.zeros(n)
        scores = weighted_sum(parts, a) + torch.zeros(n)
        if a.overlong_buffer_len:
            scores = scores + torch.tensor([overlong_penalty(
                len(reply), a.max_new_tokens, a.overlong_buffer_len, a.overlong_penalty_factor)
                for _, reply in rollouts])
        return torch.stack([scores] + [parts[name].float() for name in self.parts], dim=1)

    def _rule_scores(self, rollouts: list[tuple]) -> dict[str, torch.Tensor]:
        """Each rule's scores of the rollouts, computed once per replica (by the engine's
        driver: the code rule runs subprocesses) and shared with its other ranks."""
        rules = [name for name in self.parts if name in RULES]
        if not rules:
            return {}
        box = [None]
        if dist.get_rank() == self.engine.driver:
            box = [[[RULES[name](self._reply_text(reply), prompt.answer, self.align)
                     for prompt, reply in rollouts] for name in rules]]
        dist.broadcast_object_list(box, src=self.engine.driver, group=self.engine.group)
        return {name: torch.tensor(scores, dtype=torch.float32)
                for name, scores in zip(rules, box[0])}

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
        low = a.clip_range if a.clip_ratio_low is None else a.clip_ratio_low
        high = a.clip_range if a.clip_ratio_high is None else a.clip_ratio_high
        surrogate, clipped, ratio = losses.POLICY_LOSSES[a.policy_loss](
            logp, batch["old_logp"], batch["advantages"], mask, low, high)
        reference = batch["reference_logp"]
        kl = losses.kl_estimate(logp, reference)  # k3, the measure reported
        per_token = surrogate if a.use_kl_in_reward else \
            surrogate + a.kl_coef * losses.kl_estimate(logp, reference, a.kl_estimator)
        total, count = losses.LOSS_AGGREGATIONS[a.loss_agg_mode](per_token, mask,
                                                                 a.max_new_tokens)
        entropy = vocab_parallel_entropy(logits.detach().float())
        return total, count.to(torch.int), {
            "lm loss": torch.stack([total.detach().float(), count.detach().float()]),
            "metric/kl": _stat(kl, mask), "metric/entropy": _stat(entropy, mask),
            "metric/clipfrac": _stat(clipped, mask), "metric/ratio": _stat(ratio, mask)}

    # The step.

    def _sample(self, iteration: int, model: list, clock: dict):
        """This replica's rollouts of the step, their micro-batches and scores, and the groups
        dynamic sampling (filter_groups) dropped and generated. Dropping a group whose replies
        all score the same, it samples groups for further prompts until the step's share is
        full or max_sampling_rounds generations are spent (then dropped groups fill the rest;
        they teach nothing). The replicas take the same number of rounds (their collectives
        meet)."""
        a, g = self.align, self.align.group_size
        share = self.prompts_per_step // self.dp_size
        mine = self._step_prompts(iteration)[self.dp_rank * share:(self.dp_rank + 1) * share]
        kept, dropped, generated = [], [], 0
        for round_ in range(a.max_sampling_rounds if a.filter_groups else 1):
            began = self._now()
            rollouts = self._generate(iteration, model, mine if round_ == 0 else
                                      self._extra_prompts(iteration, round_, share), round_)
            clock["rollout"] += self._now() - began
            began = self._now()
            micro, scores = self._experience(rollouts)
            clock["reward"] += self._now() - began
            if not a.filter_groups:
                return rollouts, micro, scores, 0, share
            scores = self._shared_scores(scores)
            for k in range(share):
                group = (rollouts[k * g:(k + 1) * g], scores[k * g:(k + 1) * g])
                (kept if group[1][:, 0].max() > group[1][:, 0].min() else dropped).append(group)
            generated += share
            short = torch.tensor([float(len(kept) < share)], device=self.layout.device)
            dist.all_reduce(short, group=ps.get_data_parallel_group())
            if not short.item():
                break
        chosen = (kept + dropped)[:share]
        rollouts = [r for group, _ in chosen for r in group]
        return rollouts, self._micro_batches(rollouts), torch.cat([s for _, s in chosen]), len(dropped), generated

    def _shared_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """A reward model's scores (on the last pipeline stage) on every stage of the
        replica."""
        if self.scorer is None or ps.get_pipeline_model_parallel_world_size() == 1:
            return scores
        scores = scores.to(self.layout.device)
        dist.broadcast(scores, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
        return scores.cpu()

    def step(self, iteration, model, optimizer, scheduler, iterators, guard):
        a = self.align
        began = self._now()
        clock = {"rollout": 0.0, "reward": 0.0}
        rollouts, micro, table, filtered, generated = self._sample(iteration, model, clock)
        scores = table[:, 0]
        began_logprobs = self._now()
        # Collected on the last pipeline stage, the one that computes the losses.
        old = _pick(Role(model).forward(micro, self.schedule, self._logprob_forward), "logp")
        ref = self._remote_reference(rollouts) if self.align.reference_url else \
            _pick(self.reference.forward(micro, self.schedule, self._logprob_forward), "logp")
        values = self.critic.values(micro, self.schedule) if self.uses_critic else None
        if self.last_stage:
            self._advantages(micro, scores, old, ref, values)
        clock["logprobs"] = self._now() - began_logprobs
        began_update = self._now()
        result = StepResult(None, 0)
        for _ in range(a.ppo_epochs):
            result = train_step(model, optimizer, scheduler, [iter(micro)], **self.schedule,
                                guard=guard, forward=self._policy_forward)
            if self.uses_critic:
                value_loss = self.critic.train(micro, self.schedule)
                if value_loss is not None:
                    result.metrics["value_loss"] = value_loss
        clock["update"] = self._now() - began_update
        result.metrics.update(self._rollout_metrics(rollouts, table, filtered, generated))
        # Where the step's time goes (this rank's clock): generation, scoring, log-probabilities
        # (old, reference and values), the update; and the rollout's tokens/s (this replica's).
        for name in ("rollout", "reward", "logprobs", "update"):
            result.metrics[f"seconds_{name}"] = clock[name]
        result.metrics["seconds_step"] = self._now() - began
        result.metrics["rollout_tokens_per_second"] = \
            sum(len(r) for _, r in rollouts) / max(clock["rollout"], 1e-9)
        return result

    def _rollout_metrics(self, rollouts: list[tuple], table: torch.Tensor, filtered: int,
                         generated: int) -> dict[str, float]:
        """Over every replica's rollouts: reward mean and std (and, for a reward of several
        parts, each part's mean, reward_<part>), reply length mean and max, the share of replies
        cut at max_new_tokens, the share of groups dynamic sampling dropped."""
        lengths = torch.tensor([float(len(r)) for _, r in rollouts])
        cut = torch.tensor([float(len(r) >= self.align.max_new_tokens and r[-1] not in
                                  self.stop_ids) for _, r in rollouts])
        scores = table[:, 0].float()
        totals = torch.tensor([float(scores.sum()), float((scores ** 2).sum()),
                               float(lengths.sum()), float(len(rollouts)), float(cut.sum()),
                               float(filtered), float(generated),
                               *table[:, 1:].double().sum(dim=0).tolist()],
                              device=self.layout.device)
        dist.all_reduce(totals, group=ps.get_data_parallel_group())
        longest = lengths.max().to(self.layout.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        total, squares, length, n, cut, filtered, generated, *parts = totals.tolist()
        mean = total / n
        metrics = {"reward": mean, "reward_std": max(squares / n - mean ** 2, 0.0) ** 0.5,
                   "reply_length": length / n, "reply_length_max": float(longest),
                   "reply_clipped": cut / n, "groups_filtered": filtered / max(generated, 1.0)}
        if len(self.parts) > 1:
            metrics.update({f"reward_{name}": part / n for name, part in zip(self.parts, parts)})
        return metrics

    def _now(self) -> float:
        if self.layout.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _advantages(self, micro, scores, old, ref, values) -> None:
        """Advantages (and with a critic returns) of every reply token, into the micro-batches:
        the estimator's (advantage_estimator) of per-token rewards, the score at the last reply
        token, and with use_kl_in_reward a KL penalty on every one."""
        a = self.align
        device = old[0].device
        mask = torch.cat([b["mask"] for b in micro]).to(device)
        old_logp, ref_logp = torch.cat(old), torch.cat(ref)
        rewards = torch.zeros_like(mask)
        last = mask.size(1) - 1 - mask.flip(1).argmax(dim=1)
        rewards[torch.arange(mask.size(0)), last] += scores.to(device)
        if a.use_kl_in_reward:
            rewards -= a.kl_coef * losses.kl_estimate(old_logp, ref_logp, a.kl_estimator) * mask
        old_values = None if values is None else torch.cat(values).float() * mask
        adv, returns = ESTIMATORS[a.advantage_estimator].fn(rewards, mask, old_values, a)
        mbs = self.cfg.stage.micro_batch_size
        for k, batch in enumerate(micro):
            rows = slice(k * mbs, (k + 1) * mbs)
            batch.update(old_logp=old_logp[rows], reference_logp=ref_logp[rows],
                         advantages=adv[rows])
            if values is not None:
                batch.update(old_values=old_values[rows], returns=returns[rows])
