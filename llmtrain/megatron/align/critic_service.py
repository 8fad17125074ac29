"""The critic on every rank of a critic server (`python -m llmtrain.serve.critic`): one driver
(the first replica's last pipeline stage's first TP rank) takes each request's command and hands
it to the other ranks, which run it with it; the data-parallel replicas share each request's
micro-batches, and their gradients meet in the critic's optimizer step as in training.

Commands (what the actor's ServedCritic sends, llmtrain.megatron.align.critic):
- setup {step}: build the critic at the actor's step (its own checkpoint of that step when it
  has one, else its initial weights) -> {step, layout};
- values {rows} -> {values}: each row's value at its reply positions;
- train {rows with old_values and returns} -> {value_loss}: one optimizer step;
- save {step} -> {saved}: the step's checkpoint, committed before the answer.
"""

from __future__ import annotations

import gc

import torch.distributed as dist
from megatron.core import parallel_state as ps

from llmtrain.megatron import checkpoint
from llmtrain.megatron.align.critic import Critic, micro_batches, reply_span
from llmtrain.megatron.replica import Replica


class CommandError(RuntimeError):
    """A command the critic could not run: every rank raised alike (a checkpoint that will not
    load, say), so they all go on to the next."""


class CriticService(Replica):
    def __init__(self, cfg, layout, tokenizer, save_dir, say):
        super().__init__(layout.device, group=dist.group.WORLD)
        self.cfg, self.layout, self.tokenizer = cfg, layout, tokenizer
        self.save_dir, self.say = save_dir, say
        self.critic = None
        self.schedule = dict(seq_length=cfg.data.seq_length,
                             micro_batch_size=cfg.stage.micro_batch_size, device=layout.device)

    @property
    def replicas(self) -> int:
        return ps.get_data_parallel_world_size()

    def describe(self) -> str:
        lay = self.layout
        return (f"TP {lay.tensor_model_parallel_size} x PP {lay.pipeline_model_parallel_size} x "
                f"DP {lay.data_parallel_size} on {lay.world_size} {lay.device} process(es)")

    def run(self, command: str, payload: dict) -> dict:
        """Driver: run a command on every rank; its answer (CommandError: why it failed)."""
        self._broadcast_object((command, payload))
        answer = self._run_batch((command, payload))
        if "error" in answer:
            raise CommandError(answer["error"])
        return answer

    def _run_batch(self, batch) -> dict:
        command, payload = batch
        try:
            return getattr(self, f"_{command}")(payload)
        except Exception as error:  # answered to the client; the server goes on
            return {"error": f"{command} failed: {error}"}

    def _setup(self, payload: dict) -> dict:
        self.critic = None
        gc.collect()  # the previous setup's model and optimizer state
        self.critic = Critic(self.cfg, self.layout, self.tokenizer, payload["step"],
                             self.save_dir, None, self.say)
        return {"step": self.critic.iteration, "layout": self.describe()}

    def _share(self, rows: list[dict]) -> list[dict]:
        """This replica's micro-batches of the rows (an equal share each)."""
        micro = micro_batches(rows, self.cfg.stage.micro_batch_size, self.cfg.data.seq_length,
                              self.layout.device)
        count = len(micro) // self.replicas
        rank = ps.get_data_parallel_rank()
        return micro[rank * count:(rank + 1) * count]

    def _schedule(self, micro: list[dict]) -> dict:
        return {**self.schedule, "num_microbatches": len(micro)}

    def _values(self, payload: dict) -> dict:
        micro = self._share(payload["rows"])
        values = self.critic.values(micro, self._schedule(micro))
        mine = [v[r, slice(*reply_span(b, r))].tolist()
                for b, v in zip(micro, values) for r in range(v.size(0))]
        shares = [None] * self.replicas
        dist.all_gather_object(shares, mine, group=ps.get_data_parallel_group())
        return {"values": [v for share in shares for v in share]}

    def _train(self, payload: dict) -> dict:
        micro = self._share(payload["rows"])
        return {"value_loss": self.critic.train(micro, self._schedule(micro))}

    def _save(self, payload: dict) -> dict:
        if self.save_dir is None:
            return {"saved": None}
        self.critic.save(payload["step"], blocking=True)
        return {"saved": str(checkpoint.step_dir(self.save_dir, payload["step"]))}
