"""Checks a composed config against the machine before any process starts.

Pure Python (no torch): every problem is collected and reported at once, in plain words, with
what to change. The result is the `Layout`: the resolved process layout every worker uses.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional

from llmtrain.config.changes import unknown_entries
from llmtrain.config.layers import moe_layer_problems
from llmtrain.config.layout import Layout, Machine
from llmtrain.config.schema import Config, PeftConfig
from llmtrain.data.chat import FORMATS, TEMPLATES
from llmtrain.rlhf.checks import alignment_problems
from llmtrain.tasks import either, stage_names, stages_where, task_spec

CHOICES = {
    "model.normalization": ("RMSNorm", "LayerNorm"),
    "model.activation": ("swiglu", "quick_geglu", "gelu", "gelu_tanh", "relu"),
    "model.softmax_type": ("vanilla", "off-by-one", "learnable"),
    "model.position_embedding_type": ("rope", "learned_absolute", "alibi", "none"),
    "precision.fp8": (None, "e4m3", "hybrid"),
    "precision.fp8_recipe": ("delayed", "tensorwise", "blockwise", "mxfp8"),
    "data.kind": ("corpus", "indexed", "mock", "sft", "preference", "unpaired", "prompts"),
    "stage.name": stage_names(),
    "data.sft.format": FORMATS,
    "data.sft.chat_template": TEMPLATES,
    "data.tokenizer.tokenizer_type": ("corpus", "huggingface", "gpt2bpe", "sentencepiece", "llama2",
                                      "null"),
    "optim.optimizer": ("adam", "sgd"),
    "optim.lr_decay_style": ("constant", "linear", "cosine", "inverse-square-root", "WSD"),
    "optim.lr_wsd_decay_style": ("linear", "cosine", "exponential", "minus_sqrt"),
    "parallel.recompute_granularity": (None, "selective", "full"),
    "parallel.recompute_method": (None, "uniform", "block"),
    "parallel.moe_token_dispatcher_type": (None, "alltoall", "allgather"),
    "model.moe_router_dtype": (None, "fp32", "fp64"),
    "device": (None, "cpu", "cuda"),
    "checkpoint.resume": ("auto", "never"),
    "optim.on_nonfinite": ("stop", "skip"),
    "peft.name": ("none", "lora"),
    "model.moe_router_score_function": ("softmax", "sigmoid"),
    "model.moe_token_drop_policy": ("probs", "position"),
    "model.rope_type": ("rope", "yarn"),
}
# Megatron's linear layers a LoRA may target; peft.target_modules=[all-linear] names them all.
LORA_LAYERS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
LORA_TARGETS = (*LORA_LAYERS, "all-linear")


# The files each tokenizer type is loaded from.
TOKENIZER_FILES = {"huggingface": ("tokenizer_model",), "sentencepiece": ("tokenizer_model",),
                   "llama2": ("tokenizer_model",),
                   "gpt2bpe": ("vocab_file", "merge_file")}


def _attention_variant_problems(m) -> list[str]:
    """The sliding-window pattern, the clamped gated unit and YaRN's unrounded ramp, against
    what they need."""
    problems = []
    skip = m.window_attn_skip_freq
    if skip is not None and m.window_size is None:
        problems.append("model.window_attn_skip_freq needs model.window_size (the window of the "
                        "layers that have one)")
    if isinstance(skip, int) and skip < 1:
        problems.append(f"model.window_attn_skip_freq={skip} must be at least 1")
    elif skip is not None and not isinstance(skip, int) and (
            len(skip) != m.num_layers or set(skip) - {0, 1}):
        problems.append(f"model.window_attn_skip_freq must be an integer or one 0 (full) or 1 "
                        f"(window) per layer, {m.num_layers} of them")
    if ((m.glu_linear_offset or m.activation_func_clamp_value is not None)
            and m.activation not in ("swiglu", "quick_geglu")):
        problems.append(f"model.glu_linear_offset and activation_func_clamp_value apply to gated "
                        f"units (swiglu, quick_geglu), not activation={m.activation}")
    if m.activation_func_clamp_value is not None and m.activation != "quick_geglu":
        problems.append("model.activation_func_clamp_value: Megatron-Core clamps the gated unit "
                        "of activation=quick_geglu only")
    if not m.yarn_correction_range_round_to_int and (
            m.rope_type != "yarn" or m.multi_latent_attention):
        problems.append("model.yarn_correction_range_round_to_int=false applies to "
                        "rope_type=yarn outside multi-latent attention (whose YaRN always rounds)")
    return problems


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"the configuration has {len(problems)} problem(s):\n{lines}")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    """Megatron pads the embedding so that every TP rank holds an equal, aligned slice."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def split_fractions(split: str) -> list[float] | None:
    """Megatron's train/valid/test split string ("969,30,1") as fractions; None if malformed."""
    values = [float(v) for v in re.findall(r"[.0-9]+", split)]
    if not 1 <= len(values) <= 3 or sum(values) <= 0:
        return None
    values += [0.0] * (3 - len(values))
    return [v / sum(values) for v in values]


def _get(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def te_op_fuser_fits(cfg: Config, use_te: bool) -> bool:
    """Transformer Engine's operation fuser runs a dense SwiGLU MLP (its GELU is not the exact
    one GPT-2 and Bloom were trained with), not beside activation offloading, and hides its
    linear layers' outputs from the LoRA adapters that would add to them."""
    m = cfg.model
    return (use_te and m.activation == "swiglu" and not m.num_moe_experts
            and not m.parallel_attention_mlp and not cfg.parallel.cpu_offloading
            and not _lora_on_mlp(cfg))


def lora_targets(peft: PeftConfig) -> tuple[str, ...]:
    """The layers that peft.target_modules names."""
    return LORA_LAYERS if "all-linear" in peft.target_modules else tuple(peft.target_modules)


def _lora_on_mlp(cfg: Config) -> bool:
    mlp = {"linear_fc1", "linear_fc2"}
    return cfg.peft.name == "lora" and bool(mlp.intersection(lora_targets(cfg.peft)))


def validate(cfg: Config, machine: Machine, generates: bool = True) -> Layout:
    """Return the layout of a runnable config, or raise ConfigError listing every problem.
    `generates`: whether a grpo or ppo config's processes generate rollouts (a critic server's
    do not). Fills peft's unset settings (llmtrain.config.peft) first."""
    from llmtrain.config.peft import resolve_peft

    resolve_peft(cfg)
    problems: list[str] = []
    m, par, prec, data, stage, optim = (
        cfg.model, cfg.parallel, cfg.precision, cfg.data, cfg.stage, cfg.optim)

    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            shown = ", ".join("null" if a is None else a for a in allowed)
            problems.append(f"{key}={_get(cfg, key)} is not one of: {shown}")

    device = cfg.device or ("cuda" if machine.gpus > 0 else "cpu")
    tp, pp, cp = (par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                  par.context_parallel_size)
    vpp, ep = par.virtual_pipeline_model_parallel_size, par.expert_model_parallel_size
    for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                "context_parallel_size", "expert_model_parallel_size"):
        if getattr(par, key) < 1:
            problems.append(f"parallel.{key}={getattr(par, key)} must be at least 1")
    tp, pp, cp, ep = max(tp, 1), max(pp, 1), max(cp, 1), max(ep, 1)
    model_parallel = tp * pp * cp

    # Model shape against the parallel layout.
    groups = m.num_query_groups or m.num_attention_heads
    problems += tensor_parallel_problems(m, tp)
    if m.num_attention_heads % groups:
        problems.append(f"model.num_query_groups={groups} must divide "
                        f"model.num_attention_heads={m.num_attention_heads}: fix the model "
                        f"config (conf/model/{m.name}.yaml or model.num_query_groups=...)")
    if m.kv_channels is None and m.hidden_size % m.num_attention_heads:
        problems.append(f"model.hidden_size={m.hidden_size} is not a multiple of "
                        f"num_attention_heads={m.num_attention_heads}: set model.kv_channels")
    if m.window_size is not None and (len(m.window_size) != 2 or min(m.window_size) < 0):
        problems.append(f"model.window_size={list(m.window_size)} must be [left, right], two "
                        f"token counts of at least 0 (Megatron's --window-size)")
    problems += _attention_variant_problems(m)
    if m.parallel_mlp_layernorm and not m.parallel_attention_mlp:
        problems.append("model.parallel_mlp_layernorm=true needs model.parallel_attention_mlp=true")
    problems += pipeline_stage_problems(m.num_layers, m.name, pp, vpp,
                                        par.num_layers_in_first_pipeline_stage,
                                        par.num_layers_in_last_pipeline_stage)
    if vpp is not None and (vpp < 1 or pp < 2):
        problems.append("parallel.virtual_pipeline_model_parallel_size needs "
                        "pipeline_model_parallel_size >= 2 (and VPP >= 1)")
    if par.sequence_parallel and tp == 1:
        problems.append("parallel.sequence_parallel=true needs tensor_model_parallel_size > 1")
    if m.num_moe_experts is None and ep > 1:
        problems.append(f"parallel.expert_model_parallel_size={ep} needs a mixture-of-experts "
                        f"model (model.num_moe_experts is not set)")
    if m.num_moe_experts is not None:
        problems += routing_problems(m)
    if m.num_moe_experts is not None and m.add_bias_linear and tp > 1:
        problems.append(f"model {m.name} has experts with biases (add_bias_linear), which "
                        f"Megatron-Core splits over no tensor-parallel ranks (expert tensor "
                        f"parallel size 1), and llmtrain splits experts as it splits the rest: "
                        f"use tensor_model_parallel_size=1, not {tp} (spread the experts with "
                        f"expert_model_parallel_size)")
    problems += moe_layer_problems(m)
    if m.multi_latent_attention and m.num_query_groups not in (None, m.num_attention_heads):
        problems.append(f"model.multi_latent_attention=true gives every head its own key and "
                        f"value (from the shared latent): set model.num_query_groups=null, not "
                        f"{m.num_query_groups}")
    if m.multi_latent_attention and m.position_embedding_type != "rope":
        problems.append(f"model.multi_latent_attention=true rotates positions itself "
                        f"(model.rope_type): set model.position_embedding_type=rope, not "
                        f"{m.position_embedding_type}")
    if m.num_moe_experts is not None and m.num_moe_experts % ep:
        problems.append(f"model.num_moe_experts={m.num_moe_experts} is not divisible by "
                        f"expert_model_parallel_size={ep}: choose an expert parallel size that "
                        f"divides it")
    if cp > 1 and data.seq_length % (2 * cp):
        problems.append(f"data.seq_length={data.seq_length} must be divisible by 2 x context "
                        f"parallel size = {2 * cp}")
    if (m.position_embedding_type == "learned_absolute"
            and data.seq_length > m.max_position_embeddings):
        problems.append(f"data.seq_length={data.seq_length} exceeds the {m.max_position_embeddings} "
                        f"learned positions of model {m.name}: set data.seq_length="
                        f"{m.max_position_embeddings} or less")

    if (m.position_embedding_type == "rope" and data.seq_length > m.max_position_embeddings
            and not m.rope_scaling and not m.seq_len_interpolation_factor
            and m.rope_type != "yarn"):
        problems.append(f"data.seq_length={data.seq_length} exceeds the "
                        f"{m.max_position_embeddings} positions model {m.name} was made for "
                        f"(max_position_embeddings) and no RoPE scaling extends them: set "
                        f"data.seq_length={m.max_position_embeddings} or less, or, to train "
                        f"longer contexts on purpose, model.max_position_embeddings="
                        f"{data.seq_length}")

    # Precision against the machine.
    if prec.bf16 and prec.fp16:
        problems.append("precision: bf16 and fp16 are both true; choose one")
    use_te = device == "cuda" and machine.has_transformer_engine
    if par.sequence_parallel and not use_te:
        problems.append("parallel.sequence_parallel=true needs Transformer Engine's layers (a GPU "
                        "with llmtrain[gpu] installed); leave it unset to choose automatically")
    # GRPO and PPO generate their rollouts with the trained model itself, and Megatron's
    # inference does not split sequences (a decode step is one token long).
    spec = task_spec(stage.name)
    rollouts = bool(spec and spec.generates) and generates
    if par.sequence_parallel and rollouts:
        problems.append(f"stage={stage.name} generates its rollouts with the trained model, which "
                        f"cannot run under sequence parallelism: set "
                        f"parallel.sequence_parallel=false (or leave it unset)")
    sequence_parallel = (tp > 1 and use_te and not rollouts if par.sequence_parallel is None
                         else par.sequence_parallel)
    if prec.fp8 is not None and not use_te:
        problems.append("precision=fp8 needs NVIDIA Transformer Engine and a GPU; "
                        "install llmtrain[gpu] on a GPU machine or use precision=bf16")
    # FP8 recipes by GPU generation: per-tensor scaling from Ada/Hopper (8.9), block scaling
    # from Hopper (9.0), MXFP8 from Blackwell (10.0).
    fp8_needs = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}
    if (prec.fp8 is not None and use_te and machine.gpu_capability is not None
            and machine.gpu_capability < fp8_needs.get(prec.fp8_recipe, (0, 0))):
        need = fp8_needs[prec.fp8_recipe]
        problems.append(f"precision.fp8_recipe={prec.fp8_recipe} needs a GPU of compute "
                        f"capability {need[0]}.{need[1]} or newer; this one is "
                        f"{machine.gpu_capability[0]}.{machine.gpu_capability[1]}: use "
                        f"fp8_recipe=delayed or tensorwise")
    if cp > 1 and not use_te:
        problems.append("parallel.context_parallel_size > 1 needs Transformer Engine's attention "
                        "(a GPU with llmtrain[gpu] installed)")
    if par.recompute_granularity == "full" and not (par.recompute_method and
                                                   par.recompute_num_layers):
        problems.append("parallel.recompute_granularity=full needs recompute_method (uniform or "
                        "block) and recompute_num_layers")
    if par.recompute_granularity != "full" and (par.recompute_method or
                                                par.recompute_num_layers):
        problems.append("parallel.recompute_method/recompute_num_layers apply only to "
                        "recompute_granularity=full")
    if par.cpu_offloading:
        if not use_te:
            problems.append("parallel.cpu_offloading needs Transformer Engine on a GPU")
        if pp > 1:
            problems.append("parallel.cpu_offloading does not work with pipeline parallelism")
        if par.recompute_granularity is not None:
            problems.append("parallel.cpu_offloading and activation recomputation exclude each "
                            "other: choose one")
        if not 0 < par.cpu_offloading_num_layers < m.num_layers:
            problems.append(f"parallel.cpu_offloading_num_layers must be between 1 and "
                            f"{m.num_layers - 1} (the model has {m.num_layers} layers)")
    if prec.gradient_accumulation_fusion and not use_te:
        problems.append("precision.gradient_accumulation_fusion=true needs Transformer Engine's "
                        "layers (a GPU with llmtrain[gpu] installed)")
    if prec.use_te_op_fuser and not te_op_fuser_fits(cfg, use_te):
        problems.append("precision.use_te_op_fuser=true needs Transformer Engine's layers (a GPU "
                        "with llmtrain[gpu] installed) and a dense SwiGLU MLP without "
                        "parallel.cpu_offloading or LoRA adapters on linear_fc1/linear_fc2; "
                        "leave it unset to choose automatically")
    if par.use_distributed_optimizer and device == "cpu" and not (prec.bf16 or prec.fp16):
        problems.append("parallel.use_distributed_optimizer=true on CPU needs precision=bf16 or "
                        "fp16 (Megatron-Core's fp32 distributed optimizer cannot resume there)")
    if par.optimizer_cpu_offload and not par.use_distributed_optimizer:
        problems.append("parallel.optimizer_cpu_offload needs use_distributed_optimizer=true")
    if device == "cpu" and (par.overlap_grad_reduce or par.overlap_param_gather):
        problems.append("parallel.overlap_grad_reduce/overlap_param_gather need CUDA streams; "
                        "turn them off on CPU")
    if device == "cuda" and machine.gpus == 0:
        problems.append("device=cuda was asked for but this machine has no GPU: leave device "
                        "unset (or add dry_run=true to plan a GPU job from here)")

    # Processes: world size = nodes x processes per node = TP x PP x CP x DP.
    nnodes = max(cfg.launcher.nnodes, 1)
    wanted_dp = par.data_parallel_size
    needed = model_parallel * (wanted_dp or 1)
    nproc = cfg.launcher.nproc_per_node
    if nproc is None:
        nproc = machine.gpus if device == "cuda" else -(-needed // nnodes)
    world = nnodes * nproc
    short_of_gpus = device == "cuda" and machine.gpus > 0 and (
        nproc > machine.gpus or world < needed)
    if short_of_gpus:
        problems.append(f"parallel={par.name} needs {max(needed, world)} GPUs (TP {tp} x PP {pp} "
                        f"x CP {cp} x DP {wanted_dp or max(world // model_parallel, 1)}) but this "
                        f"machine has {machine.gpus}: choose a smaller layout or more GPUs")
    dp = 1
    if short_of_gpus:
        pass  # the one message above says what to do
    elif world % model_parallel:
        problems.append(f"world size {world} is not a multiple of TP {tp} x PP {pp} x CP {cp} = "
                        f"{model_parallel}: set launcher.nproc_per_node to a multiple of "
                        f"{model_parallel}")
    else:
        dp = max(world // model_parallel, 1)
        if wanted_dp is not None and wanted_dp != dp and not short_of_gpus:
            problems.append(f"parallel.data_parallel_size={wanted_dp} but world size {world} = "
                            f"TP {tp} x PP {pp} x CP {cp} x DP {dp}: world size must equal "
                            f"TP x PP x CP x DP")
    if ep > 1 and (dp * cp) % ep:
        problems.append(f"expert parallel size {ep} must divide DP x CP = {dp * cp}: choose "
                        f"parallel.expert_model_parallel_size to divide it")

    # Batch and schedule.
    mbs, gbs = stage.micro_batch_size, stage.global_batch_size
    num_microbatches = 1
    if mbs < 1 or gbs < 1:
        problems.append("stage.micro_batch_size and stage.global_batch_size must be at least 1")
    elif gbs % (mbs * dp):
        problems.append(f"stage.global_batch_size={gbs} is not divisible by micro_batch_size "
                        f"{mbs} x data parallel size {dp} = {mbs * dp}: choose a multiple of "
                        f"{mbs * dp}")
    else:
        num_microbatches = gbs // (mbs * dp)
        if vpp and num_microbatches % pp:
            problems.append(f"the interleaved pipeline schedule needs the number of micro-batches "
                            f"({num_microbatches}) to be a multiple of PP {pp}: choose a global "
                            f"batch of a multiple of {mbs * dp * pp}")
    if stage.train_iters is None or stage.train_iters < 1:
        problems.append(f"stage.train_iters={stage.train_iters} must be at least 1 (or set "
                        f"stage.train_tokens)")
    if data.seq_length < 1:
        problems.append(f"data.seq_length={data.seq_length} must be at least 1")
    for key in ("lr", "min_lr"):
        if getattr(optim, key) < 0:
            problems.append(f"optim.{key}={getattr(optim, key)} is negative: a learning rate is "
                            f"0 or more (e.g. optim.{key}={'3e-4' if key == 'lr' else '3e-5'})")
    if optim.min_lr > optim.lr >= 0:
        problems.append(f"optim.min_lr={optim.min_lr} is above optim.lr={optim.lr}: lower "
                        f"optim.min_lr (stage=sft sets optim.lr=1e-5, min_lr=1e-6)")
    decay_iters = optim.lr_decay_iters or stage.train_iters or 0
    if optim.lr_warmup_iters >= max(decay_iters, 1) and optim.lr_decay_style != "constant":
        problems.append(f"optim.lr_warmup_iters={optim.lr_warmup_iters} must be below the "
                        f"decay length ({decay_iters} iterations): lower optim.lr_warmup_iters "
                        f"or lengthen the run")
    if optim.lr_decay_style == "WSD" and not optim.lr_wsd_decay_iters:
        problems.append("optim.lr_decay_style=WSD needs optim.lr_wsd_decay_iters "
                        "(the length of the final decay)")
    if data.kind == "indexed" and not data.data_path:
        problems.append("data=indexed needs data.data_path: the prefixes written by "
                        "`python -m llmtrain.data tokenize` (optionally weighted)")
    fractions = split_fractions(data.split)
    if fractions is None:
        problems.append(f"data.split={data.split} must be one to three non-negative weights "
                        f"(train,valid,test) with a positive sum, e.g. 969,30,1")
    elif stage.eval_interval and fractions[1] == 0:
        problems.append(f"the valid split has no samples: data.split={data.split} gives it no "
                        f"share; give it one (e.g. \"data.split='98,2,0'\") or set "
                        f"stage.eval_interval=0")
    log = cfg.logging
    last_step = stage.train_iters or log.profile_step_end
    if log.profile and not 1 <= log.profile_step_start <= log.profile_step_end <= last_step:
        problems.append(f"logging.profile needs 1 <= profile_step_start "
                        f"({log.profile_step_start}) <= profile_step_end "
                        f"({log.profile_step_end}) <= stage.train_iters ({stage.train_iters})")
    if stage.exit_interval is not None and stage.exit_interval < 1:
        problems.append(f"stage.exit_interval={stage.exit_interval} must be at least 1 (or null: "
                        f"run to the end)")
    if stage.epochs is not None and stage.epochs < 1:
        problems.append(f"stage.epochs={stage.epochs} must be at least 1 (or null: run "
                        f"stage.train_iters steps)")
    elif stage.epochs is not None and stage.train_tokens is not None:
        problems.append("stage.epochs and stage.train_tokens both set the length of the run: "
                        "choose one")
    elif stage.epochs is not None and data.kind != "sft":
        problems.append(f"stage.epochs needs a dataset of known size (data.kind=sft), not "
                        f"data.kind={data.kind}: set stage.epochs=null and choose "
                        f"stage.train_iters")
    if data.kind == "sft":
        if not data.data_path:
            problems.append("data=sft needs data.data_path: json/jsonl/parquet files of "
                            "conversations, prefixes written by `python -m llmtrain.data tokenize "
                            "--sft`, or self-cognition")
        if data.sft.packing and device == "cuda" and stage.micro_batch_size != 1:
            problems.append("data.sft.packing=true on GPUs needs stage.micro_batch_size=1 (packed "
                            "sequences are one row of several samples); raise global_batch_size "
                            "instead")
        if data.sft.chat_template == "tokenizer" and data.tokenizer.tokenizer_type != "huggingface":
            problems.append("data.sft.chat_template=tokenizer needs a Hugging Face tokenizer "
                            "directory (data.tokenizer.tokenizer_type=huggingface); or choose a "
                            "named template: chatml, llama3")
    tok = data.tokenizer
    for key in TOKENIZER_FILES.get(tok.tokenizer_type, ()):
        if not getattr(tok, key):
            problems.append(f"data.tokenizer.tokenizer_type={tok.tokenizer_type} needs "
                            f"data.tokenizer.{key} (the tokenizer the data was made with)")

    problems += checkpoint_problems(cfg)
    problems += peft_problems(cfg)
    problems += alignment_problems(cfg, dp, generates)
    padded_vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, tp)
    problems += role_layout_problems(cfg, world, padded_vocab)

    if problems:
        raise ConfigError(problems)
    return Layout(
        device=device, nnodes=nnodes, nproc_per_node=nproc,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
        expert_model_parallel_size=ep, data_parallel_size=dp,
        num_microbatches=num_microbatches,
        padded_vocab_size=padded_vocab,
        use_transformer_engine=use_te,
        sequence_parallel=sequence_parallel,
    )


def pipeline_stage_layers(num_layers: int, pp: int, first: Optional[int] = None,
                          last: Optional[int] = None) -> Optional[list[int]]:
    """Each pipeline stage's layer count (Megatron-Core's uneven split: the first and last
    stages as given, the rest evenly); None where no such split exists."""
    if pp == 1:
        return [num_layers] if first is None and last is None else None
    ends = [n for n in (first, last) if n is not None]
    middle_stages, middle_layers = pp - len(ends), num_layers - sum(ends)
    if min(ends, default=1) < 1 or middle_layers < middle_stages or (
            middle_stages == 0 and middle_layers) or (
            middle_stages and middle_layers % middle_stages):
        return None
    even = [middle_layers // middle_stages] * middle_stages if middle_stages else []
    return ([first] if first is not None else []) + even + ([last] if last is not None else [])


def pipeline_stage_problems(num_layers: int, name: str, pp: int, vpp: Optional[int],
                            first: Optional[int], last: Optional[int]) -> list[str]:
    if first is None and last is None:
        if num_layers % pp:
            return [f"model {name} has {num_layers} layers, which pipeline parallel size {pp} "
                    f"does not divide: choose a layout whose stages divide the layers, or give "
                    f"the first and last stages counts of their own (parallel.num_layers_in_"
                    f"first_pipeline_stage, parallel.num_layers_in_last_pipeline_stage)"]
        stages = [num_layers // pp] * pp
    elif pp < 2:
        return ["parallel.num_layers_in_first/last_pipeline_stage need "
                "pipeline_model_parallel_size >= 2"]
    else:
        stages = pipeline_stage_layers(num_layers, pp, first, last)
        if stages is None:
            return [f"model {name} has {num_layers} layers, which parallel.num_layers_in_first"
                    f"_pipeline_stage={first} and num_layers_in_last_pipeline_stage={last} "
                    f"cannot split over {pp} pipeline stages: the other stages must share the "
                    f"rest evenly, at least one layer each"]
    if vpp and any(n % vpp for n in stages):
        return [f"model {name}'s pipeline stages hold {stages} layers, which VPP {vpp} does not "
                f"divide: choose a VPP size (or stage sizes) that divides each"]
    return []


def routing_problems(m) -> list[str]:
    """A mixture-of-experts router's settings that Megatron-Core would refuse at build time."""
    problems = []
    if m.moe_router_topk == 1 and m.moe_router_score_function == "softmax" and \
            not m.moe_router_pre_softmax:
        problems.append("model.moe_router_topk=1 with softmax scores needs "
                        "model.moe_router_pre_softmax=true (a softmax over the one chosen logit "
                        "is always 1: the router would get no gradient)")
    if m.moe_router_enable_expert_bias and m.moe_router_score_function != "sigmoid":
        problems.append("model.moe_router_enable_expert_bias=true (aux-loss-free balancing) "
                        "needs model.moe_router_score_function=sigmoid")
    if m.moe_expert_capacity_factor is not None and m.moe_expert_capacity_factor <= 0:
        problems.append(f"model.moe_expert_capacity_factor={m.moe_expert_capacity_factor} must "
                        f"be above 0 (or null: no token dropped)")
    if m.moe_pad_expert_input_to_capacity and m.moe_expert_capacity_factor is None:
        problems.append("model.moe_pad_expert_input_to_capacity=true pads up to a capacity: set "
                        "model.moe_expert_capacity_factor too")
    groups, chosen = m.moe_router_num_groups, m.moe_router_group_topk
    if chosen is not None and (groups is None or m.num_moe_experts % groups or chosen > groups
                               or chosen < 1):
        problems.append(f"model.moe_router_group_topk={chosen} (group-limited routing) needs "
                        f"model.moe_router_num_groups dividing the {m.num_moe_experts} experts, "
                        f"at least as many as the groups chosen (it is {groups})")
    return problems


def tensor_parallel_problems(m, tp: int, what: str = "tensor parallel size ") -> list[str]:
    """The model's shape against a tensor-parallel size (the run's, or a role's own)."""
    problems, groups = [], m.num_query_groups or m.num_attention_heads
    if tp < 1:
        return problems
    if m.num_attention_heads % tp:
        problems.append(f"model {m.name} has {m.num_attention_heads} attention heads, which "
                        f"{what}{tp} does not divide: choose a TP that divides it")
    elif groups % tp:
        problems.append(f"model {m.name} has {groups} KV groups (num_query_groups), which "
                        f"{what}{tp} does not divide: choose a TP that divides it")
    if m.ffn_hidden_size % tp:
        problems.append(f"model.ffn_hidden_size={m.ffn_hidden_size} is not divisible by "
                        f"{what}{tp}: choose a TP that divides it")
    return problems


def role_layout_problems(cfg: Config, world_size: int, padded_vocab: int) -> list[str]:
    """Alignment roles (reference, reward model, critic) on a tensor-parallel layout of their
    own (docs/rlhf.md)."""
    a, problems = cfg.stage.alignment, []
    spec = task_spec(cfg.stage.name)
    used = spec.roles(cfg) if spec else set()
    for role in ("reference", "reward", "critic"):
        key = f"{role}_tensor_model_parallel_size"
        tp = getattr(a, key)
        setting = f"stage.alignment.{key}={tp}"
        if tp is None:
            continue
        if role not in used:
            where = f"stage={either(stages_where(lambda s: role in s.possible_roles))}" + (
                " with a reward model (stage.alignment.reward=model, or combined with "
                "reward_weights.model)" if role == "reward" else "")
            problems.append(f"{setting} applies to {where}, not this run: unset it")
        elif tp < 1 or world_size % tp:
            problems.append(f"{setting} must divide the {world_size} processes: the {role} "
                            f"model lies over every rank in groups of that size")
        elif role == "critic" and cfg.parallel.pipeline_model_parallel_size > 1:
            problems.append(f"{setting}: a critic of its own layout learns from the returns of "
                            f"the last pipeline stage, which the other stages lack; use "
                            f"pipeline_model_parallel_size=1 or unset it")
        elif cfg.model.num_moe_experts:
            problems.append(f"{setting}: a mixture-of-experts {role} runs on the run's layout "
                            f"only; unset it")
        else:
            problems += tensor_parallel_problems(cfg.model, tp, f"stage.alignment.{key}=")
            if padded_vocab % tp:
                problems.append(f"{setting} does not divide the padded vocabulary "
                                f"({padded_vocab}): choose a size that divides it")
    return problems


def checkpoint_problems(cfg: Config) -> list[str]:
    """Retention, explicit steps and allowed config changes (docs/reliability.md)."""
    ck, problems = cfg.checkpoint, []
    for key in ("keep_last", "keep_every", "save_interval"):
        value = getattr(ck, key)
        if value is not None and value < (0 if key == "save_interval" else 1):
            problems.append(f"checkpoint.{key}={value} must be at least "
                            f"{0 if key == 'save_interval' else 1} (or null)")
    if ck.keep_every is not None and not ck.keep_last:
        problems.append("checkpoint.keep_every keeps steps that keep_last would delete: set "
                        "checkpoint.keep_last too (without it every checkpoint is kept)")
    if ck.save_hf and not ck.save:
        problems.append("checkpoint.save_hf writes its Hugging Face folder beside the Megatron "
                        "checkpoints: set checkpoint.save too")
    if ck.save_hf_interval is not None and (
            ck.save_hf_interval < 1 or not ck.save_interval
            or ck.save_hf_interval % ck.save_interval):
        problems.append(f"checkpoint.save_hf_interval={ck.save_hf_interval} must be a multiple "
                        f"of checkpoint.save_interval={ck.save_interval} (it exports saved "
                        f"steps), or null (the last step only)")
    if ck.load_step is not None and ck.load_step < 0:
        problems.append(f"checkpoint.load_step={ck.load_step} must be a step number (>= 0)")
    if ck.load_step is not None and ck.resume == "never":
        problems.append("checkpoint.load_step and checkpoint.resume=never contradict each other: "
                        "drop one")
    unknown = unknown_entries(list(ck.allow_config_change), dataclasses.asdict(cfg))
    if unknown:
        problems.append(f"checkpoint.allow_config_change names {', '.join(unknown)}, which is no "
                        f"config field or group (write them as on the command line, e.g. "
                        f"model.hidden_size, or `tokenizer`)")
    return problems


def peft_problems(cfg: Config) -> list[str]:
    """LoRA's settings (docs/lora.md)."""
    from llmtrain.config.peft import peft_settings

    peft, problems = peft_settings(cfg.peft, cfg.model)
    if peft.name != "lora":
        return [f"peft.load={peft.load} is a LoRA adapter: add peft=lora to train it further"] \
            if peft.load else problems
    if peft.r < 1:
        problems.append(f"peft.r={peft.r} must be at least 1 (the adapters' rank)")
    if peft.lora_alpha <= 0:
        problems.append(f"peft.lora_alpha={peft.lora_alpha} must be positive (the adapters' "
                        f"output is scaled by lora_alpha / r)")
    if not 0 <= peft.lora_dropout < 1:
        problems.append(f"peft.lora_dropout={peft.lora_dropout} must be in [0, 1)")
    unknown = [t for t in peft.target_modules if t not in LORA_TARGETS]
    if unknown or not peft.target_modules:
        problems.append(f"peft.target_modules={list(peft.target_modules)}: name one or more of "
                        f"{', '.join(LORA_TARGETS)}")
    if not cfg.checkpoint.load:
        problems.append("peft=lora trains adapters on a frozen base model: give its checkpoint "
                        "with checkpoint.load=<folder> (a trained or converted model)")
    from llmtrain.convert.peft import FAMILIES as PEFT_FAMILIES  # it imports this module

    if cfg.checkpoint.save_hf and cfg.model.family not in PEFT_FAMILIES:
        problems.append(f"checkpoint.save_hf with peft=lora writes a PEFT adapter folder, which "
                        f"supports the {', '.join(PEFT_FAMILIES)} families, not "
                        f"{cfg.model.family}: unset checkpoint.save_hf and export the adapters "
                        f"merged into the base with python -m llmtrain.convert "
                        f"direction=mcore_to_hf")
    spec = task_spec(cfg.stage.name)
    if cfg.checkpoint.save_hf and spec is not None and spec.scalar_head:
        problems.append("checkpoint.save_hf with peft=lora writes a PEFT adapter folder, which "
                        "has no place for a reward model's scalar head: unset checkpoint.save_hf "
                        "(the run's checkpoints hold adapters and head; serve or score with "
                        "them)")
    if spec is not None and not spec.adapters:
        problems.append(f"peft=lora with stage={cfg.stage.name} is not supported yet: use "
                        f"stage={either(stages_where(lambda s: s.adapters))}, or peft=none")
    a = cfg.stage.alignment
    for key in ("reference_load", "reference_tensor_model_parallel_size"):
        if getattr(a, key) is not None:
            problems.append(f"stage.alignment.{key}: with peft=lora the reference is the base "
                            f"model itself, its adapters switched off: unset it")
    if cfg.model.num_moe_experts:
        problems.append("peft=lora on a mixture-of-experts model is not supported yet (expert "
                        "layers are sharded by expert parallelism): use peft=none")
    return problems
