"""Model roles of the alignment stages: language models with a scalar head (reward models,
critics), and frozen roles (reference policy, reward model) loaded from checkpoints.

A scalar head reads the final hidden state (after the last norm) through Megatron's
`output_processor` hook of GPTModel, in place of the output layer, which a head model does not
have (so its embedding is never tied to one). It is replicated on the tensor-parallel ranks,
initialised like any other weight (llmtrain.megatron.init), and saved under `scalar_head.`;
a language-model checkpoint loads into a head model weights-only, leaving the head as
initialised (checkpoint.HEADS).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import Float16Module

from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config
from llmtrain.megatron import checkpoint, lora_checkpoint
from llmtrain.megatron.align.placement import Placement, role_layout
from llmtrain.megatron.init import initialize as initialize_weights
from llmtrain.megatron.model import build_model
from llmtrain.megatron.step import forward_only, train_step


class ScalarHead(torch.nn.Module):
    """hidden [s, b, h] -> one score per position, [b, s] in fp32."""

    def __init__(self, config):
        super().__init__()
        self.sequence_parallel = config.sequence_parallel
        self.weight = torch.nn.Parameter(torch.empty(1, config.hidden_size,
                                                     dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(1, dtype=config.params_dtype))

    def output(self, hidden_states: torch.Tensor, **_) -> torch.Tensor:
        """GPTModel's output_processor: called on the last pipeline stage."""
        if self.sequence_parallel:  # every TP rank scores the whole sequence itself
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        scores = torch.nn.functional.linear(hidden_states, self.weight, self.bias)
        return scores.squeeze(-1).transpose(0, 1).float()


class ScalarGPTModel(GPTModel):
    """GPTModel whose last stage ends in a scalar head instead of the output layer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.post_process:
            self.output_layer = None
            self.scalar_head = ScalarHead(self.config)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        # LanguageModule marks the output layer's vocabulary padding, which is not here.
        post_process, self.post_process = self.post_process, False
        try:
            return super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self.post_process = post_process


def build_scalar_model(cfg: Config, layout: Layout, groups=None) -> list:
    """Chunks of a GPT backbone with a scalar head on its last stage (never tied: there is no
    output layer)."""
    untied = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, share_embeddings_and_output_weights=False))
    return build_model(untied, layout, ScalarGPTModel, groups)


def causal_inputs(rows: int, length: int, device: str) -> dict:
    """Position ids and attention mask of `rows` right-padded sequences of `length` tokens
    (Megatron's CPU attention takes an explicit causal mask; GPU kernels need none)."""
    mask = ~torch.tril(torch.ones((1, 1, length, length), dtype=torch.bool)) \
        if device == "cpu" else None
    return {"position_ids": torch.arange(length).expand(rows, length), "attention_mask": mask}


def model_inputs(batch: dict, device: str) -> tuple:
    """tokens, position ids and attention mask of a micro-batch, on `device`."""
    mask = batch["attention_mask"]
    return (batch["tokens"].to(device), batch["position_ids"].to(device),
            None if mask is None else mask.to(device))


def score_forward(device, iterator, model):
    """Forward step of a reward model: each sequence's score at `last`, the position that
    predicts its last token (as stage=rm trains it)."""
    batch = next(iterator)
    values = model(*model_inputs(batch, device), output_processor=scores(model))
    last = batch["last"].to(device)
    return values, lambda v: (v.sum(), torch.tensor(1), {
        "lm loss": torch.zeros(2), "score": v.gather(1, last[:, None])[:, 0].detach()})


def scores(chunk):
    """GPTModel's output_processor for a head model: the scalar head on the last pipeline
    stage; None on the others, which pass their hidden states on."""
    model = checkpoint.unwrap(chunk)
    return model.scalar_head.output if model.post_process else None


class Role:
    """A model beside the trained one (reference, reward model, critic), on the run's layout or
    on a tensor-parallel layout of its own (`placement`)."""

    def __init__(self, chunks: list, placement: Optional[Placement] = None):
        self.chunks, self.placement = chunks, placement

    def _batches(self, micro: list[dict], schedule: dict) -> tuple[list[dict], dict]:
        """The micro-batches this rank runs, and the schedule's arguments for them."""
        batches = micro if self.placement is None else \
            self.placement.gather(micro, schedule["device"])
        groups = None if self.placement is None else self.placement.groups
        return batches, {**schedule, "num_microbatches": len(batches), "groups": groups}

    def _own(self, outputs: list, micro: list[dict]) -> list:
        return outputs if self.placement is None else self.placement.own(outputs, len(micro))

    def forward(self, micro: list[dict], schedule: dict, forward) -> list[dict]:
        """The loss functions' reports of each micro-batch of this rank's (on the last
        pipeline stage of the run's layout; with a placement of its own, on every rank)."""
        batches, args = self._batches(micro, schedule)
        return self._own(forward_only(self.chunks, [iter(batches)], **args, forward=forward),
                         micro)

    def train(self, optimizer, scheduler, micro: list[dict], schedule: dict, forward):
        """One optimizer step on this rank's micro-batches (and, with a placement of its own,
        those of the other replicas in its tensor-parallel group)."""
        batches, args = self._batches(micro, schedule)
        return train_step(self.chunks, optimizer, scheduler, [iter(batches)], **args,
                          forward=forward)


class AdaptersOff(Role):
    """The reference of a peft=lora run: the trained model itself, its adapters switched off and
    in eval mode while it runs (no second copy of the base weights)."""

    def forward(self, micro: list[dict], schedule: dict, forward) -> list[dict]:
        from llmtrain.megatron.lora import adapters_disabled

        training = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            with adapters_disabled(self.chunks):
                return super().forward(micro, schedule, forward)
        finally:
            for chunk, mode in zip(self.chunks, training):
                chunk.train(mode)


def load_frozen(cfg: Config, layout: Layout, source: Optional[str], scalar: bool, say,
                placement: Optional[Placement] = None, step: Optional[int] = None) -> Role:
    """A role that is not trained: the seed's initial weights, or `step` (default: the latest)
    of `source`; in the precision's format, gradients off, in eval mode; on the run's layout, or
    on a `placement` of its own."""
    layout, groups = role_layout(placement, layout)
    chunks = build_scalar_model(cfg, layout, groups) if scalar \
        else build_model(cfg, layout, groups=groups)
    initialize_weights(chunks, cfg.seed)
    name = "scorer" if scalar else "reference"
    if source:
        step = checkpoint.latest_iteration(source) if step is None else step
        if step is None:
            raise FileNotFoundError(f"{source} holds no complete checkpoint step")
        lora_checkpoint.load_merged(source, step, chunks)  # a LoRA run's: merged
        say(f"loaded {checkpoint.step_dir(source, step)} (frozen {name})")
    if placement is not None:
        say(f"frozen {name}: tensor parallel {placement.tensor_parallel} over every rank, its "
            f"own layout")
    wrapped = []
    for chunk in chunks:
        chunk.requires_grad_(False)
        if chunk.config.fp16 or chunk.config.bf16:
            chunk = Float16Module(chunk.config, chunk)
        chunk.eval()
        wrapped.append(chunk)
    return Role(wrapped, placement)
