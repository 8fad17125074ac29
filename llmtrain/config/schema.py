"""Typed schema of every config group.

The YAML files under `conf/` are merged onto these dataclasses (see `store.py`), so a misspelt key
or a value of the wrong type fails at composition, before anything runs. Field names follow
Megatron-LM's arguments where the meaning is the same, so that its users recognise them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """A transformer architecture: one named entry per published model size (`conf/model/`)."""

    name: str = MISSING
    # Family of the Hugging Face mapping (llama, qwen2, mistral, gpt2, bloom, falcon, ...).
    family: str = "llama"
    num_layers: int = MISSING
    hidden_size: int = MISSING
    ffn_hidden_size: int = MISSING
    num_attention_heads: int = MISSING
    # Grouped-query attention: KV heads. None means one KV head per query head.
    num_query_groups: Optional[int] = None
    kv_channels: Optional[int] = None
    # The tokenizer's vocabulary; the embedding is padded up to a multiple of
    # make_vocab_size_divisible_by x tensor_model_parallel_size, as Megatron does.
    vocab_size: int = MISSING
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    layernorm_epsilon: float = 1e-5
    activation: str = "swiglu"  # swiglu | quick_geglu | gelu | gelu_tanh | relu
    # Gated units (swiglu, quick_geglu): gate(x_gate) * (x_linear + glu_linear_offset), both
    # halves clamped first when activation_func_clamp_value is set (the gate from above, the
    # linear half on both sides): gpt-oss's experts, quick_geglu with 1.0 and 7.0.
    glu_linear_offset: float = 0.0
    activation_func_clamp_value: Optional[float] = None
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    # Qwen3: RMSNorm (or LayerNorm) over each query and key head before RoPE.
    qk_layernorm: bool = False
    position_embedding_type: str = "rope"  # rope | learned_absolute | alibi | none
    # Bloom: a LayerNorm right after the word embeddings.
    embedding_layernorm: bool = False
    # Falcon: attention and MLP both read the layer's input and add to the residual together.
    parallel_attention_mlp: bool = False
    # Falcon 40B/180B: in a parallel layer the MLP has its own LayerNorm (else it shares the
    # attention's).
    parallel_mlp_layernorm: bool = False
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    # GLM-4: RoPE rotates interleaved channel pairs (GPT-J style) instead of the two halves.
    rotary_interleaved: bool = False
    # Llama 3.1 RoPE frequency scaling.
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    # Linear RoPE scaling (position interpolation): positions are divided by this factor.
    seq_len_interpolation_factor: Optional[float] = None
    share_embeddings_and_output_weights: bool = False
    # Sliding-window attention (Mistral 7B v0.1): each token sees [left, right] tokens around it;
    # None: the whole causal context.
    window_size: Optional[list[int]] = None
    # Sliding window on some layers only: every N-th layer (N=2: the 2nd, 4th, ...) has full
    # attention (gpt-oss), or one 1 (window) or 0 (full) per layer; None: the window on all.
    window_attn_skip_freq: Any = None
    # The attention softmax: vanilla, off-by-one (a 1 added to its denominator) or learnable
    # (a learned logit per head in the denominator: gpt-oss's attention sinks).
    softmax_type: str = "vanilla"
    init_method_std: float = 0.02
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # Multi-latent attention (DeepSeek-V2/V3): queries straight from the hidden state
    # (q_lora_rank null) or through a normalised low-rank latent, keys and values from one shared
    # latent of kv_lora_rank; each head's query and key are qk_head_dim channels without position
    # and qk_pos_emb_head_dim with RoPE (the key's shared by all heads), its value v_head_dim.
    # qk_layernorm=true is the norm of each latent.
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    # RoPE: rope (rotary_base), or yarn (YaRN: the positions of original_max_position_embeddings
    # stretched rotary_scaling_factor times, with its beta_fast, beta_slow ramp and attention
    # factors mscale and mscale_all_dim), in multi-latent attention and in the others alike;
    # yarn_correction_range_round_to_int=false keeps the ramp's ends unrounded (gpt-oss).
    rope_type: str = "rope"
    rotary_scaling_factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    yarn_correction_range_round_to_int: bool = True
    # Mixture of experts (None: dense).
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    # The MoE layers: every N-th layer (N=1: all), or one 0 (dense) or 1 (MoE) per layer, e.g.
    # DeepSeek's first three dense layers [0, 0, 0, 1, ...]. Dense layers are ffn_hidden_size
    # wide, each expert moe_ffn_hidden_size (None: ffn_hidden_size).
    moe_layer_freq: Any = 1
    moe_ffn_hidden_size: Optional[int] = None
    # Always-on shared expert beside the routed ones (Qwen MoE), and its sigmoid gate.
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    moe_router_load_balancing_type: str = "aux_loss"  # aux_loss | seq_aux_loss | none
    moe_aux_loss_coeff: float = 0.01
    # Softmax over all experts before the top-k choice, weights not renormalised (Qwen1.5/2-MoE:
    # norm_topk_prob false); false: softmax over the k chosen logits (Mixtral, Qwen3-MoE).
    moe_router_pre_softmax: bool = False
    # The chosen experts' weights multiplied by this (DeepSeek's routed_scaling_factor; None: 1).
    moe_router_topk_scaling_factor: Optional[float] = None
    # The router's logits and softmax in this format whatever the precision (fp32 | fp64; None:
    # the model's).
    moe_router_dtype: Optional[str] = None
    # How the router scores the experts (softmax | sigmoid, DeepSeek-V3's) and, for
    # group-limited routing, the groups the experts fall into and how many a token may use.
    moe_router_score_function: str = "softmax"
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    # Aux-loss-free balancing: a per-expert bias added to the scores for the choice alone,
    # moved after each step toward the less loaded experts at this rate (sigmoid scores).
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    # Token dropping: each expert takes at most capacity_factor x its even share of the tokens
    # (None: none is dropped), dropping by lowest routing weight (probs) or last position;
    # padded up to the capacity when asked (fixed shapes).
    moe_expert_capacity_factor: Optional[float] = None
    moe_token_drop_policy: str = "probs"
    moe_pad_expert_input_to_capacity: bool = False


@dataclass
class ParallelConfig:
    """How the model and the batch are split over processes."""

    name: str = "tp1pp1"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    # Uneven pipeline stages: the first's and last's layer counts (the embedding and the output
    # layer make those stages heavier); the other stages share the rest evenly. None: even.
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    # None: whatever the processes leave (world size / (TP x PP x CP)).
    data_parallel_size: Optional[int] = None
    # None: on when TP > 1 and Transformer Engine's layers run (the local layers cannot).
    sequence_parallel: Optional[bool] = None
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # MoE token routing between expert-parallel ranks (None: alltoall on GPU, allgather on CPU).
    moe_token_dispatcher_type: Optional[str] = None
    # Memory for compute: activation recomputation (selective: attention core only; full:
    # whole layers, `recompute_num_layers` of them per stage by `recompute_method`).
    recompute_granularity: Optional[str] = None  # selective | full
    recompute_method: Optional[str] = None  # uniform | block
    recompute_num_layers: Optional[int] = None
    # Activations of the first `cpu_offloading_num_layers` layers kept in host memory (GPU).
    cpu_offloading: bool = False
    cpu_offloading_num_layers: int = 0
    # Optimizer state and step on the CPU (with the distributed optimizer).
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = 1.0


@dataclass
class PrecisionConfig:
    """Numeric formats of parameters, compute and gradients."""

    name: str = "fp32"
    bf16: bool = False
    fp16: bool = False
    # FP8 through Transformer Engine: format (e4m3 | hybrid) and scaling recipe.
    fp8: Optional[str] = None
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise | mxfp8
    # fp16 loss scaling: None = dynamic, a number = static.
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 4294967296.0
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    grad_reduce_in_fp32: bool = True
    # Weight gradients accumulated by the GEMM straight into the fp32 gradient buffer
    # (Transformer Engine layers; None: on wherever they run).
    gradient_accumulation_fusion: Optional[bool] = None
    # The SwiGLU MLP (norm, FC1, activation, FC2) through Transformer Engine's operation fuser,
    # which fuses the activation into its neighbours (None: on wherever TE runs a SwiGLU MLP).
    use_te_op_fuser: Optional[bool] = None


@dataclass
class TokenizerConfig:
    """Which tokenizer the data was (or will be) tokenized with."""

    # corpus: the BPE tokenizer trained on the embedded default corpus;
    # huggingface: a tokenizer directory or tokenizer.json (tokenizer_model);
    # gpt2bpe: vocab_file + merge_file; sentencepiece: tokenizer_model; llama2: a SentencePiece
    # tokenizer_model whose template token is BOS (Megatron-LM's Llama2Tokenizer).
    tokenizer_type: str = "corpus"
    tokenizer_model: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    # Ids reserved on top of the tokenizer's vocabulary (Megatron's --extra-vocab-size).
    extra_vocab_size: int = 0
    # The end-of-document token (None: the tokenizer's declared eos_token, then sep_token).
    eod_token: Optional[str] = None


@dataclass
class SFTConfig:
    """Instruction data (data.kind=sft): conversations become tokens with a loss mask that is
    1 on the assistant's tokens only."""

    # alpaca (instruction/input/output) | sharegpt (conversations) | messages (role/content) |
    # auto (told apart by their keys)
    format: str = "auto"
    # chatml (Qwen) | llama3 | tokenizer (the chat_template of the tokenizer directory)
    chat_template: str = "chatml"
    # System prompt of conversations that bring none (None: no system turn).
    system: Optional[str] = None
    # Several conversations per sequence with no attention across them, instead of one
    # conversation per sequence padded to seq_length.
    packing: bool = False
    # Who the generated self-cognition set (data_path entry `self-cognition`) says the model is.
    model_name: str = "llmtrain"
    model_author: str = "the llmtrain developers"


@dataclass
class DataConfig:
    """Where training samples come from."""

    name: str = "corpus"
    # corpus: the embedded default corpus (built and cached on first use);
    # indexed: Megatron mmap datasets given by data_path; mock: random tokens;
    # sft: conversations (json/jsonl/parquet files, pre-tokenized prefixes, `self-cognition`);
    # preference: prompt/chosen/rejected records (rm, dpo); unpaired: prompt/completion/label
    # records (kto); prompts: prompt/answer records (grpo, ppo); all three also take the
    # generated set `arithmetic`.
    kind: str = "corpus"
    # Megatron's --data-path: prefixes, optionally weighted ("0.7 /a/b_text_document 0.3 /c/d").
    data_path: list[str] = field(default_factory=list)
    split: str = "969,30,1"
    seq_length: int = 256
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # Where the index caches of GPTDataset go (None: next to the run's output).
    data_cache_path: Optional[str] = None
    # DataLoader worker processes (None: 2 on GPU, none on CPU).
    num_workers: Optional[int] = None
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    sft: SFTConfig = field(default_factory=SFTConfig)


@dataclass
class AlignmentConfig:
    """Reward model, DPO, KTO, GRPO and PPO settings (stage=rm|dpo|kto|grpo|ppo; rlhf.md)."""

    # Frozen reference policy (dpo, kto, grpo, ppo): a checkpoint folder; None: checkpoint.load,
    # or the seed's initial weights when that is unset too.
    reference_load: Optional[str] = None
    # Roles on a tensor-parallel layout of their own, without pipeline stages, over every rank
    # (None: the run's layout; docs/rlhf.md): the reference (dpo, kto, grpo, ppo), the reward
    # model of reward=model (grpo, ppo), the critic (ppo).
    reference_tensor_model_parallel_size: Optional[int] = None
    reward_tensor_model_parallel_size: Optional[int] = None
    critic_tensor_model_parallel_size: Optional[int] = None
    # dpo: reference log-probabilities once for the whole training set before the first step
    # (precomputed; the reference is then freed), or every step (on_the_fly).
    reference_logprobs: str = "on_the_fly"  # on_the_fly | precomputed
    # dpo: loss sigmoid (DPO), ipo (IPO), or the reference-free simpo (margin simpo_gamma) and
    # orpo (beta weighs the odds-ratio term), strength beta; length_normalized uses each reply's
    # mean token log-probability instead of the sum (simpo and orpo always do).
    loss_type: str = "sigmoid"  # sigmoid | ipo | simpo | orpo
    beta: float = 0.1
    simpo_gamma: float = 0.5
    length_normalized: bool = False
    # kto (also beta, length_normalized): the weights of desirable and undesirable examples'
    # losses (the paper's lambda_D and lambda_U; TRL's names).
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    # grpo, ppo: where rewards come from: rules (the weights of reward_weights), a reward model
    # (reward_load, a stage=rm checkpoint) alone, a server (reward_url: the user's, or `python -m
    # llmtrain.serve` of a stage=rm checkpoint at <address>/v1/rewards) alone, or combined: the
    # rules and the model's and/or the server's score, weighed by reward_weights.model, .remote.
    reward: str = "rule"  # rule | model | remote | combined
    reward_load: Optional[str] = None
    reward_url: Optional[str] = None
    # grpo, ppo: the reference on a server of its own (`python -m llmtrain.serve` of it: its
    # address) instead of on the training ranks; ppo: the critic on a server of its own
    # (`python -m llmtrain.serve.critic` with the run's settings and a layout of its own: its
    # address). Servers answer within server_timeout seconds (setup and saves of the critic:
    # ten times that; llmtrain.rlhf.remote).
    reference_url: Optional[str] = None
    critic_url: Optional[str] = None
    server_timeout: float = 60.0
    # Weights of the reward's parts: the rules (llmtrain.rlhf.rewards.RULES: exact_match,
    # format, digits, math, code) and, with reward=combined, the scores (SCORES: model, remote);
    # code runs the reply against the record's answer (Python tests) in a sandboxed subprocess
    # of code_timeout seconds and code_memory_mb MiB.
    reward_weights: dict[str, float] = field(default_factory=lambda: {
        "exact_match": 1.0, "format": 0.0, "digits": 0.0, "math": 0.0, "code": 0.0,
        "model": 0.0, "remote": 0.0})
    code_timeout: float = 5.0
    code_memory_mb: int = 512
    # The answer is the last match of answer_pattern in a reply (exact_match); format gives 1
    # when the whole reply matches format_pattern.
    answer_pattern: str = "-?[0-9]+"
    format_pattern: str = "-?[0-9]+"
    # Rollouts: replies per prompt (grpo's group; ppo usually 1), their length and sampling.
    group_size: int = 4
    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    # Sequences the inference engine generates at once (None: the whole rollout batch).
    generation_batch_size: Optional[int] = None
    # Optimizer passes over each rollout batch, clipped surrogate range, KL to the reference
    # (grpo: a loss term; ppo: a per-token reward penalty).
    ppo_epochs: int = 1
    clip_range: float = 0.2
    kl_coef: float = 0.05
    # The policy-gradient family (docs/rlhf.md; verl's names): advantage_estimator grpo | rloo |
    # reinforce_plus_plus | gae (ppo); norm_adv_by_std false: grpo without the std (Dr. GRPO);
    # policy_loss vanilla (a ratio per token) | gspo (per sequence); loss_agg_mode token-mean |
    # seq-mean-token-mean | seq-mean-token-sum-norm (Dr. GRPO); clip_ratio_low/high: a decoupled
    # clip range (DAPO; None: clip_range).
    advantage_estimator: str = "grpo"
    norm_adv_by_std: bool = True
    policy_loss: str = "vanilla"
    loss_agg_mode: str = "token-mean"
    clip_ratio_low: Optional[float] = None
    clip_ratio_high: Optional[float] = None
    # The KL to the reference: a loss term (false) or a per-token reward penalty (true: ppo);
    # its estimator k1 | k2 | k3.
    use_kl_in_reward: bool = False
    kl_estimator: str = "k3"
    # DAPO: dynamic sampling (filter_groups: groups whose replies all score the same are
    # dropped and the batch refilled from more prompts, up to max_sampling_rounds generations
    # per step), and overlong shaping (a penalty rising to overlong_penalty_factor over the
    # last overlong_buffer_len tokens before max_new_tokens; 0: none).
    filter_groups: bool = False
    max_sampling_rounds: int = 3
    overlong_buffer_len: int = 0
    overlong_penalty_factor: float = 1.0
    # ppo: critic (value model) initialisation (None: reward_load, else the seed), learning
    # rate (None: optim.lr), value clipping, and GAE's discount and lambda.
    critic_load: Optional[str] = None
    critic_lr: Optional[float] = None
    value_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95


@dataclass
class StageConfig:
    """What is trained and for how long: pretrain, sft, or an alignment stage (rm, dpo, kto,
    grpo, ppo: docs/rlhf.md)."""

    name: str = "pretrain"
    micro_batch_size: int = 4
    global_batch_size: int = 16
    # Length of the run: iterations, or tokens (then train_iters = tokens / (global batch x seq)).
    train_iters: Optional[int] = 100
    train_tokens: Optional[int] = None
    # Passes over the training set; when set, train_iters is derived from the dataset's size
    # when the run starts (data.kind=sft).
    epochs: Optional[int] = None
    # Stop (with a checkpoint) after a step divisible by this, as Megatron-LM's --exit-interval:
    # the same command later resumes the schedule where it stopped.
    exit_interval: Optional[int] = None
    # Evaluation on the validation split every eval_interval steps (0: never).
    eval_interval: int = 0
    eval_iters: int = 4
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule."""

    name: str = "adam"
    optimizer: str = "adam"  # adam | sgd
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0
    lr_decay_style: str = "cosine"  # constant | linear | cosine | inverse-square-root | WSD
    lr_warmup_iters: int = 0
    # None: decay over the whole run.
    lr_decay_iters: Optional[int] = None
    # WSD: length of the final decay (after the stable phase) and its shape.
    lr_wsd_decay_iters: Optional[int] = None
    lr_wsd_decay_style: str = "linear"
    # The same lengths in tokens (Pai-Megatron-Patch's WARMUP_TOKENS...): they set the *_iters.
    lr_warmup_tokens: Optional[int] = None
    lr_decay_tokens: Optional[int] = None
    lr_wsd_decay_tokens: Optional[int] = None
    # A NaN or infinite loss or gradient (checked before the weight update, on every rank):
    # stop the run, or skip the step (no update), as Megatron-LM's --check-for-nan-in-loss-and-grad.
    check_for_nan_in_loss_and_grad: bool = True
    on_nonfinite: str = "stop"  # stop | skip


@dataclass
class CheckpointConfig:
    """Megatron-Core distributed checkpoints."""

    name: str = "default"
    # Relative paths are inside the run's output folder.
    save: Optional[str] = "checkpoints"
    save_interval: int = 50
    # None: resume from `save` when it holds a checkpoint.
    load: Optional[str] = None
    # Load weights only and start a new schedule (fine-tuning from a converted model).
    finetune: bool = False
    # Where a Hugging Face folder given as `load` is converted to, once (llmtrain/hf_load.py;
    # a relative path starts from the current folder); None: $LLMTRAIN_CACHE/hf_import, that is
    # ~/.cache/llmtrain/hf_import.
    hf_import_dir: Optional[str] = None
    save_on_exit: bool = True
    # A Hugging Face folder (hf_iter_NNNNNNN/ in `save`, with the tokenizer) of the last step,
    # and of every save_hf_interval-th step (a multiple of save_interval) when set.
    save_hf: bool = False
    save_hf_interval: Optional[int] = None
    # auto: resume from the latest complete step (`save` first, then `load`), skipping incomplete
    # ones with a warning; never: start from fresh weights. load_step: exactly this step, or fail.
    resume: str = "auto"  # auto | never
    load_step: Optional[int] = None
    # Retention: keep the last keep_last complete steps (None: all) plus every keep_every-th step.
    keep_last: Optional[int] = None
    keep_every: Optional[int] = None
    # Write in background processes (dist_checkpointing's async save) while training goes on.
    async_save: bool = False
    # SHA-256 of every file (integrity.json), checked on load: a damaged file is named.
    verify_integrity: bool = True
    # Fields (or whole groups, e.g. `model`, or `tokenizer`) that may differ from the
    # checkpoint's config on resume, beyond those that always may (docs/reliability.md).
    allow_config_change: list[str] = field(default_factory=list)
    # On SIGTERM/SIGUSR1: save at the next step boundary and exit with status 3 (requeue).
    exit_signal_handler: bool = True


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning (docs/lora.md). none: every weight trains. lora: low-rank
    adapters on a frozen base model (checkpoint.load), named as Hugging Face PEFT names them."""

    name: str = "none"  # none | lora
    # A Hugging Face PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) trained
    # elsewhere, to train further: it gives the settings below, which may then be left unset.
    load: Optional[str] = None
    # null (the four below): peft.load's value, else the default in LORA_DEFAULTS.
    r: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_dropout: Optional[float] = None
    # Megatron's linear layers (linear_qkv, linear_proj, linear_fc1, linear_fc2), or all-linear.
    target_modules: Optional[list[str]] = None


LORA_DEFAULTS = {"r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": ["all-linear"]}


@dataclass
class LoggingConfig:
    """Console and TensorBoard logging, and the experiment trackers (llmtrain/tracking.py)."""

    name: str = "default"
    log_interval: int = 1
    tensorboard: bool = True
    # Relative paths are inside the run's output folder.
    tensorboard_dir: str = "tensorboard"
    # Weights & Biases (needs `pip install wandb`): on when a project is named.
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    # MLflow (needs `pip install mlflow`): on when a tracking URI is given (http://host:5000,
    # file:///path, sqlite:///path.db); the run name defaults to the run's name.
    mlflow_tracking_uri: Optional[str] = None
    mlflow_experiment: str = "llmtrain"
    mlflow_run_name: Optional[str] = None
    # torch.profiler over steps profile_step_start..profile_step_end on profile_ranks: a Chrome
    # trace in <run>/profile and a summary of the GPU's time in the log (llmtrain/profiling.py).
    profile: bool = False
    profile_step_start: int = 10
    profile_step_end: int = 12
    profile_ranks: list[int] = field(default_factory=lambda: [0])


@dataclass
class SlurmConfig:
    """What `launcher=slurm` asks sbatch for (see docs/launchers.md)."""

    partition: Optional[str] = None
    account: Optional[str] = None
    # Wall-clock limit in Slurm's formats: minutes, HH:MM:SS or D-HH:MM:SS.
    time: str = "01:00:00"
    gpus_per_node: int = 8
    # None: Slurm's default; with `exclusive` the job owns whole nodes.
    cpus_per_task: Optional[int] = None
    mem_gb: Optional[int] = None
    exclusive: bool = True
    # Any other sbatch option, by its long name: {qos: high, constraint: h100, reservation: x}.
    sbatch: dict[str, Any] = field(default_factory=dict)
    # Shell lines run before the job starts (module load ..., source .venv/bin/activate).
    setup: list[str] = field(default_factory=list)
    # Run each node inside this container image (Pyxis/enroot: srun --container-image).
    container_image: Optional[str] = None
    container_mounts: Optional[str] = None
    # The interpreter on the nodes; None: this one, or `python` inside container_image.
    python: Optional[str] = None
    # Preemption: Slurm sends SIGUSR1 this long before the time limit; the workers save and
    # the job requeues itself and resumes from its latest checkpoint.
    signal_delay_s: int = 90
    requeue: bool = True
    # Block until the job ends and print its summary (else submit and return).
    wait: bool = False


@dataclass
class LauncherConfig:
    """How worker processes are started."""

    name: str = "local"
    nnodes: int = 1
    # This node's place among nnodes (set by launcher=env/dlc from RANK, by Slurm itself).
    node_rank: int = 0
    # None: one per GPU on a GPU machine; on CPU, as many as the parallel layout needs.
    nproc_per_node: Optional[int] = None
    master_addr: str = "127.0.0.1"
    # None: a free port.
    master_port: Optional[int] = None
    # Environment applied to every worker (NCCL settings and the like).
    env: dict[str, str] = field(default_factory=dict)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


@dataclass
class Config:
    """The whole run: one field per config group plus a few run-wide settings."""

    name: str = "${stage.name}_${model.name}"
    seed: int = 1234
    # Print the resolved plan (layout, parameters, memory) and exit.
    dry_run: bool = False
    # Force a device: null = GPU when present, else CPU.
    device: Optional[str] = None
    output_dir: str = "${hydra:runtime.output_dir}"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
