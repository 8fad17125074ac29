"""Megatron-Core DDP, optimizer (plain or distributed) and learning-rate schedule."""

from __future__ import annotations

from functools import partial

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import Float16Module

from llmtrain.config.schema import Config
from llmtrain.megatron.model import params_dtype


def wrap_ddp(cfg: Config, chunks: list, groups: ProcessGroupCollection | None = None
             ) -> list[DistributedDataParallel]:
    """Mixed-precision wrapper, then Megatron's DDP with contiguous gradient buffers (`groups`:
    the process groups the chunks were built with, when not the run's)."""
    par = cfg.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.use_distributed_optimizer,
        average_in_collective=False,
    )
    wrapped = []
    for index, chunk in enumerate(chunks):
        config = chunk.config
        if config.fp16 or config.bf16:
            chunk = Float16Module(config, chunk)
        wrapped.append(DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=chunk,
            # Only the first chunk's bucket is delayed when overlapping (as Megatron-LM does).
            disable_bucketing=index > 0, pg_collection=groups,
        ))
    # Hooks the pipeline schedule calls (all chunks share one TransformerConfig): after backward,
    # DP gradient reduction, tied-embedding sync and division by the global loss-token count;
    # with overlap, gradient sync per chunk as its backward ends and parameter gather per chunk.
    config = chunks[0].config
    config.finalize_model_grads_func = (finalize_model_grads if groups is None
                                        else partial(finalize_model_grads, pg_collection=groups))
    if par.overlap_grad_reduce:
        config.no_sync_func = _per_chunk([c.no_sync for c in wrapped])
        config.grad_sync_func = _per_chunk([c.start_grad_sync for c in wrapped])
    if par.overlap_param_gather:
        config.param_sync_func = _per_chunk([c.start_param_sync for c in wrapped])
    return wrapped


def _per_chunk(funcs: list):
    """The schedules take one function for one chunk, a list for virtual pipeline chunks."""
    return funcs[0] if len(funcs) == 1 else funcs


def build_optimizer(cfg: Config, model: list[DistributedDataParallel],
                    groups: ProcessGroupCollection | None = None):
    optim, prec = cfg.optim, cfg.precision
    config = OptimizerConfig(
        optimizer=optim.optimizer,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        sgd_momentum=optim.sgd_momentum,
        clip_grad=optim.clip_grad,
        bf16=prec.bf16,
        fp16=prec.fp16,
        params_dtype=params_dtype(cfg),
        loss_scale=prec.loss_scale,
        initial_loss_scale=prec.initial_loss_scale,
        min_loss_scale=prec.min_loss_scale,
        loss_scale_window=prec.loss_scale_window,
        hysteresis=prec.hysteresis,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        optimizer_cpu_offload=cfg.parallel.optimizer_cpu_offload,
        optimizer_offload_fraction=cfg.parallel.optimizer_offload_fraction,
    )
    # Megatron's extra gloo groups come from parallel_state: none for a model's own groups.
    optimizer = get_megatron_optimizer(config, model, pg_collection=groups,
                                       use_gloo_process_groups=groups is None)
    # The schedule multiplies each micro-batch loss by the current loss scale before backward
    # (fp16); the optimizer divides the gradients back before the update.
    model[0].config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Schedule counted in iterations (Megatron-LM counts samples; one step here is one batch)."""
    optim = cfg.optim
    decay_iters = optim.lr_decay_iters or cfg.stage.train_iters
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.lr_warmup_iters else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.lr_warmup_iters,
        lr_decay_steps=max(decay_iters, optim.lr_warmup_iters + 1),
        lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=decay_iters,
        wd_incr_style="constant",
        wsd_decay_steps=optim.lr_wsd_decay_iters,
        lr_wsd_decay_style=optim.lr_wsd_decay_style,
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
