"""PPO's critic: a value-head model that learns each reply token's return, trained in step with the
actor. It runs on the training ranks (`Critic`: the run's layout or a tensor-parallel layout of
its own) or on ranks of its own behind a server (`ServedCritic`, a client of
`python -m llmtrain.serve.critic`, which runs a `Critic` of any TP x PP x DP on its ranks).

Either way its steps are saved with the actor's, under <checkpoint.save>/critic, each committed
before the actor's, and a resumed actor resumes the critic of its own step.

Rollouts travel to a server as rows: the tokens the model reads (the prompt and the reply, all
but the last), `start` (the first reply position: the one that predicts the reply's first token)
and per reply position the old values and returns (`rows` and `micro_batches` convert).
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from llmtrain.config.schema import PeftConfig
from llmtrain.errors import RunStopped
from llmtrain.megatron import checkpoint, parallel
from llmtrain.megatron.align.heads import (
    Role,
    build_scalar_model,
    causal_inputs,
    model_inputs,
    scores,
)
from llmtrain.megatron.align.placement import role_layout
from llmtrain.megatron.align.servers import from_server
from llmtrain.megatron.init import initialize as initialize_weights
from llmtrain.megatron.optimizer import build_optimizer, build_scheduler, wrap_ddp
from llmtrain.rlhf import losses
from llmtrain.rlhf.remote import critic_request


def _value_forward(device, iterator, model):
    batch = next(iterator)
    values = model(*model_inputs(batch, device), output_processor=scores(model))
    return values, lambda v: (v.sum(), torch.tensor(1), {"lm loss": torch.zeros(2),
                                                        "values": v.detach()})


def _train_forward(value_clip: float, device, iterator, model):
    batch = next(iterator)
    values = model(*model_inputs(batch, device), output_processor=scores(model))
    return values, partial(_value_loss, batch, device, value_clip)


def _value_loss(batch: dict, device: str, value_clip: float, values: torch.Tensor):
    mask = batch["mask"].to(device)
    loss = losses.clipped_value(values, batch["old_values"].to(device),
                                batch["returns"].to(device), value_clip)
    total, tokens = (loss * mask).sum(), mask.sum()
    return total, tokens.to(torch.int), {"lm loss": torch.stack([total.detach().float(),
                                                                 tokens.float()])}


def _refuse_adapters(source: Optional[str]) -> None:
    """The critic trains every weight: it cannot start from a peft=lora run's adapters."""
    from llmtrain.megatron.lora_checkpoint import adapter_of

    step = checkpoint.latest_iteration(source) if source else None
    if step is not None and adapter_of(Path(source), step) is not None:
        raise RunStopped(f"the critic trains every weight and would start from {source}, which "
                         f"holds LoRA adapters (a peft=lora run's): give "
                         f"stage.alignment.critic_load a whole model's checkpoint (e.g. the "
                         f"base the adapters were trained on)",
                         exit_code=2)


class Critic:
    """The critic on this process's ranks: built, restored to the actor's step `start` (else
    initialised from critic_load, reward_load or checkpoint.load), trained and saved with its
    own optimizer (at stage.alignment.critic_lr) and checkpoints (`save_dir`)."""

    def __init__(self, cfg, layout, tokenizer, start: int, save_dir, placement, say):
        a = cfg.stage.alignment
        self.value_clip = a.value_clip
        lr = a.critic_lr or cfg.optim.lr
        if start and save_dir is not None and start in checkpoint.listing(save_dir).complete:
            # Resuming: the critic of the actor's step, even where a later critic save
            # committed and the actor's did not (a crash between the two).
            load = dict(load=str(save_dir), finetune=False, load_step=start)
        else:
            load = dict(load=a.critic_load or a.reward_load or cfg.checkpoint.load,
                        finetune=True, load_step=None)
            _refuse_adapters(load["load"])
        # peft=lora puts adapters on the actor alone: the critic trains every weight.
        critic_cfg = dataclasses.replace(
            cfg, peft=PeftConfig(),
            optim=dataclasses.replace(cfg.optim, lr=lr, min_lr=min(cfg.optim.min_lr, lr)),
            checkpoint=dataclasses.replace(cfg.checkpoint, **load))
        layout, groups = role_layout(placement, layout)
        chunks = build_scalar_model(critic_cfg, layout, groups)
        initialize_weights(chunks, cfg.seed)
        self.role = Role(wrap_ddp(critic_cfg, chunks, groups), placement)
        self.optimizer = build_optimizer(critic_cfg, self.role.chunks, groups)
        self.scheduler = build_scheduler(critic_cfg, self.optimizer)
        self.checkpoints = checkpoint.Checkpoints(critic_cfg, layout, tokenizer, save_dir, say)
        self.iteration = self.checkpoints.restore(self.role.chunks, self.optimizer,
                                                  self.scheduler).iteration
        if placement is not None:
            say(f"tensor parallel {placement.tensor_parallel} over every rank, its own layout")
        if start and self.iteration != start:
            say(f"warning: the critic resumes from step {self.iteration}, the actor from step "
                f"{start}")

    def values(self, micro: list[dict], schedule: dict) -> list[torch.Tensor]:
        """Each micro-batch's value of every position [mbs, seq] (on the last pipeline stage)."""
        return [r["values"] for r in self.role.forward(micro, schedule, _value_forward)]

    def train(self, micro: list[dict], schedule: dict) -> Optional[float]:
        """One optimizer step on the micro-batches' old values and returns; the mean per-token
        value loss (on the last pipeline stage; None elsewhere)."""
        return self.role.train(self.optimizer, self.scheduler, micro, schedule,
                               partial(_train_forward, self.value_clip)).loss

    def save(self, iteration: int, blocking: bool) -> None:
        self.checkpoints.save(iteration, self.role.chunks, self.optimizer, self.scheduler,
                              blocking=blocking)

    def poll(self) -> None:
        self.checkpoints.poll()

    def saving(self) -> bool:
        return self.checkpoints.pending is not None

    def wait(self) -> None:
        self.checkpoints.wait()


def reply_span(batch: dict, row: int) -> tuple[int, int]:
    """(start, end) of a micro-batch row's reply positions: from the first masked one to the
    last position the model reads."""
    return int(batch["mask"][row].argmax()), int(batch["last"][row]) + 1


def rows(micro: list[dict], returns: bool = False) -> list[dict]:
    """The micro-batches' rollouts as a server reads them (with their old values and returns:
    the train request)."""
    out = []
    for batch in micro:
        for r in range(batch["tokens"].size(0)):
            start, length = reply_span(batch, r)
            row = {"tokens": batch["tokens"][r, :length].tolist(), "start": start}
            if returns:
                row["old_values"] = batch["old_values"][r, start:length].tolist()
                row["returns"] = batch["returns"][r, start:length].tolist()
            out.append(row)
    return out


def micro_batches(rows: list[dict], micro_batch_size: int, seq_length: int, device: str
                  ) -> list[dict]:
    """Micro-batches of rows (right-padded to seq_length), as `Critic` takes them."""
    count = len(rows)
    tokens = torch.zeros((count, seq_length), dtype=torch.long)
    mask, old_values, returns = (torch.zeros((count, seq_length)) for _ in range(3))
    last = torch.zeros(count, dtype=torch.long)
    for i, row in enumerate(rows):
        length, start = len(row["tokens"]), row["start"]
        tokens[i, :length] = torch.tensor(row["tokens"])
        mask[i, start:length] = 1.0
        last[i] = length - 1
        if row.get("returns") is not None:
            old_values[i, start:length] = torch.tensor(row["old_values"])
            returns[i, start:length] = torch.tensor(row["returns"])
    shared = causal_inputs(micro_batch_size, seq_length, device)
    return [{"tokens": tokens[at:at + micro_batch_size], "mask": mask[at:at + micro_batch_size],
             "last": last[at:at + micro_batch_size],
             "old_values": old_values[at:at + micro_batch_size],
             "returns": returns[at:at + micro_batch_size], **shared}
            for at in range(0, count, micro_batch_size)]


def _talker() -> int:
    """The global rank that talks to the server: the logging rank (the first replica's last
    pipeline stage's first TP rank: it holds the returns, and gathers every replica's rows)."""
    flags = [None] * dist.get_world_size()
    dist.all_gather_object(flags, parallel.is_logging_rank())
    return flags.index(True)


class ServedCritic:
    """The critic on a server of its own (`python -m llmtrain.serve.critic` at
    stage.alignment.critic_url): one request per call, for every data-parallel replica's
    rollouts at once, so that the critic takes one optimizer step per actor step as it does on
    the training ranks. The server sets itself up at the actor's step `start`."""

    def __init__(self, url: str, timeout: float, start: int, say):
        self.url, self.timeout, self.say = url, timeout, say
        self.talker = _talker()
        self.last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        answer = self._call("setup", lambda: {"step": start}, slow=True)
        say(f"critic: served at {url}, {answer['layout']}, from step {answer['step']}"
            + (f" (warning: the actor resumes from step {start})"
               if start and answer["step"] != start else ""))

    def _call(self, command: str, payload, slow: bool = False):
        """`payload()` (on the talker) POSTed to the server's /v1/critic/<command>; its answer,
        on every rank."""
        return from_server(lambda: critic_request(self.url, command, payload(),
                                                  self.timeout * (10 if slow else 1)),
                           self.talker)

    def _every_replica(self, mine: list[dict]) -> list:
        """Every data-parallel replica's rows, in replica order (on the last pipeline stage)."""
        if not self.last_stage:
            return []
        shares = [None] * ps.get_data_parallel_world_size()
        dist.all_gather_object(shares, mine, group=ps.get_data_parallel_group())
        return [row for share in shares for row in share]

    def values(self, micro: list[dict], schedule: dict) -> list[torch.Tensor]:
        mine = rows(micro) if self.last_stage else []
        every = self._every_replica(mine)
        answer = self._call("values", lambda: {"rows": every})["values"]
        if not self.last_stage:
            return []
        count = len(mine)
        values = answer[ps.get_data_parallel_rank() * count:][:count]
        table = torch.zeros(count, schedule["seq_length"])
        for i, (row, value) in enumerate(zip(mine, values)):
            table[i, row["start"]:row["start"] + len(value)] = torch.tensor(value)
        mbs = schedule["micro_batch_size"]
        return [table[at:at + mbs].to(schedule["device"]) for at in range(0, count, mbs)]

    def train(self, micro: list[dict], schedule: dict) -> Optional[float]:
        every = self._every_replica(rows(micro, returns=True) if self.last_stage else [])
        return self._call("train", lambda: {"rows": every})["value_loss"]

    def save(self, iteration: int, blocking: bool) -> None:
        """The server saves and commits the step before it answers: the actor's commit comes
        after it."""
        if self._call("save", lambda: {"step": iteration}, slow=True)["saved"] is None:
            self.say(f"warning: the critic server saved nothing at step {iteration} (its "
                     f"checkpoint.save is null): a resumed run would start the critic afresh")

    def poll(self) -> None:
        pass

    def saving(self) -> bool:
        return False

    def wait(self) -> None:
        pass
