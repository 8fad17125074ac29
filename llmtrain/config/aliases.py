"""Other tools' names for llmtrain's settings, as data: ms-swift's arguments, Megatron-LM's flags
and the positional arguments of Pai-Megatron-Patch's scripts, each mapped to llmtrain overrides.

The migration pages (docs/migrate_*.md) show these tables as `markdown()` renders them, and the
tests compose every override in them. ms-swift's names that mean exactly one llmtrain field are
also accepted on the `python -m llmtrain` command line: `rewrite()` turns `learning_rate=1e-5`
into `optim.lr=1e-5` before Hydra composes, and says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    """One name of another tool and what it is in llmtrain.

    `override` is what to type (space-separated overrides with example values, for `command`);
    empty when llmtrain has no such setting, and `note` then says what to do instead. `alias`:
    the name is accepted on llmtrain's command line and becomes `override`'s key; `values`
    translates its values where the names of values differ."""

    source: str
    override: str
    note: str = ""
    command: str = "llmtrain"  # llmtrain | llmtrain.convert | llmtrain.generate | ...
    alias: bool = False
    values: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.override.split("=", 1)[0]


def _alias(source: str, override: str, note: str = "", **values: str) -> Row:
    return Row(source, override, note, alias=True, values=values)


# ms-swift: the arguments of `megatron sft/pt` (Megatron-SWIFT, Megatron-LM's names with
# underscores) and those of `swift sft/pt` (transformers' Trainer) that users carry over.
MS_SWIFT: list[Row] = [
    _alias("learning_rate", "optim.lr=1e-5"),
    _alias("lr", "optim.lr=1e-5"),
    _alias("min_lr", "optim.min_lr=1e-6"),
    _alias("lr_scheduler_type", "optim.lr_decay_style=cosine",
           "cosine, linear, constant (constant_with_warmup: constant, inverse_sqrt: "
           "inverse-square-root)", constant_with_warmup="constant",
           inverse_sqrt="inverse-square-root"),
    _alias("lr_decay_style", "optim.lr_decay_style=cosine"),
    _alias("warmup_steps", "optim.lr_warmup_iters=100"),
    _alias("lr_warmup_iters", "optim.lr_warmup_iters=100"),
    Row("warmup_ratio", "optim.lr_warmup_iters=100",
        "a fraction of the run: give the steps (warmup_ratio x stage.train_iters)"),
    Row("lr_warmup_fraction", "optim.lr_warmup_iters=100",
        "give the steps (fraction x stage.train_iters)"),
    _alias("weight_decay", "optim.weight_decay=0.1"),
    _alias("adam_beta1", "optim.adam_beta1=0.9"),
    _alias("adam_beta2", "optim.adam_beta2=0.95"),
    _alias("adam_epsilon", "optim.adam_eps=1e-8"),
    _alias("adam_eps", "optim.adam_eps=1e-8"),
    _alias("max_grad_norm", "optim.clip_grad=1.0"),
    _alias("clip_grad", "optim.clip_grad=1.0"),
    _alias("batch_size", "stage.micro_batch_size=1"),
    _alias("per_device_train_batch_size", "stage.micro_batch_size=1"),
    _alias("micro_batch_size", "stage.micro_batch_size=1"),
    _alias("global_batch_size", "stage.global_batch_size=64"),
    Row("gradient_accumulation_steps", "stage.global_batch_size=64",
        "llmtrain sets the global batch: micro_batch_size x data-parallel size x the "
        "accumulation steps (Megatron's convention; the plan prints the micro-batches per step)"),
    _alias("num_train_epochs", "stage.epochs=3"),
    _alias("max_epochs", "stage.epochs=3"),
    _alias("max_steps", "stage.train_iters=1000", "with stage.epochs=null when stage=sft"),
    _alias("train_iters", "stage.train_iters=1000", "with stage.epochs=null when stage=sft"),
    _alias("eval_steps", "stage.eval_interval=200"),
    _alias("eval_interval", "stage.eval_interval=200"),
    _alias("eval_iters", "stage.eval_iters=10"),
    _alias("logging_steps", "logging.log_interval=5"),
    _alias("log_interval", "logging.log_interval=5"),
    _alias("save_steps", "checkpoint.save_interval=500"),
    _alias("save_interval", "checkpoint.save_interval=500"),
    _alias("save_total_limit", "checkpoint.keep_last=2"),
    _alias("save", "checkpoint.save=/ckpt/run"),
    _alias("load", "checkpoint.load=/ckpt/qwen2_7b"),
    _alias("resume_from_checkpoint", "checkpoint.load=/ckpt/run",
           "a training checkpoint resumes with its optimizer and step; a converted one needs "
           "checkpoint.finetune=true"),
    _alias("finetune", "checkpoint.finetune=true"),
    Row("output_dir", "hydra.run.dir=/runs/qwen2_7b_sft",
        "the run's folder (logs, TensorBoard, checkpoints/); not an alias: llmtrain's own "
        "output_dir follows hydra.run.dir"),
    _alias("tp", "parallel.tensor_model_parallel_size=2"),
    _alias("tensor_model_parallel_size", "parallel.tensor_model_parallel_size=2"),
    _alias("pp", "parallel.pipeline_model_parallel_size=2"),
    _alias("pipeline_model_parallel_size", "parallel.pipeline_model_parallel_size=2"),
    _alias("cp", "parallel.context_parallel_size=2"),
    _alias("context_parallel_size", "parallel.context_parallel_size=2"),
    _alias("ep", "parallel.expert_model_parallel_size=2"),
    _alias("expert_model_parallel_size", "parallel.expert_model_parallel_size=2"),
    _alias("sequence_parallel", "parallel.sequence_parallel=true"),
    _alias("use_distributed_optimizer", "parallel.use_distributed_optimizer=true"),
    _alias("recompute_granularity", "parallel.recompute_granularity=selective"),
    _alias("recompute_method", "parallel.recompute_method=uniform"),
    _alias("recompute_num_layers", "parallel.recompute_num_layers=1"),
    _alias("max_length", "data.seq_length=4096"),
    _alias("packing", "data.sft.packing=true"),
    _alias("dataset", "data.data_path=[/data/alpaca_zh.jsonl,self-cognition]",
           "local json/jsonl/parquet files, prefixes of `python -m llmtrain.data tokenize "
           "--sft`, and self-cognition (ms-swift's swift/self-cognition); hub ids are not "
           "downloaded"),
    _alias("system", "data.sft.system='You are a helpful assistant.'"),
    _alias("model_name", "data.sft.model_name=Xiaohuang",
           "one name (ms-swift takes a Chinese and an English one)"),
    _alias("model_author", "data.sft.model_author=ModelScope"),
    _alias("template", "data.sft.chat_template=chatml",
           "chatml (qwen), llama3, or tokenizer (the tokenizer's own chat template)",
           qwen="chatml", qwen2="chatml", qwen2_5="chatml"),
    _alias("num_workers", "data.num_workers=4"),
    _alias("dataloader_num_workers", "data.num_workers=4"),
    _alias("torch_dtype", "precision=bf16", "bfloat16, float16, float32",
           bfloat16="bf16", float16="fp16", float32="fp32"),
    Row("bf16", "precision=bf16", "a config group: bf16, fp16, fp32, fp8"),
    Row("seed", "seed=42", "the same name in llmtrain"),
    Row("model", "checkpoint.load=/models/Qwen2-7B-Instruct",
        "the Hugging Face folder: its config.json gives the model and it is the tokenizer, "
        "converted once (docs/convert.md); llmtrain's `model=` names an architecture of "
        "conf/model/"),
    Row("train_type", "",
        "llmtrain trains all parameters (full); LoRA is not supported"),
    Row("split_dataset_ratio", "\"data.split='98,2,0'\"",
        "train,valid,test shares (quoted: Hydra reads a bare 98,2,0 as a sweep)"),
    Row("report_to", "logging.wandb_project=my_project",
        "TensorBoard is always written; Weights & Biases with logging.wandb_project"),
]


# Megatron-LM's flags (pretrain_gpt.py and friends).
MEGATRON_LM: list[Row] = [
    Row("--tensor-model-parallel-size", "parallel.tensor_model_parallel_size=4"),
    Row("--pipeline-model-parallel-size", "parallel.pipeline_model_parallel_size=2"),
    Row("--num-layers-per-virtual-pipeline-stage",
        "parallel.virtual_pipeline_model_parallel_size=2",
        "llmtrain gives the number of virtual stages, not layers per stage"),
    Row("--decoder-first-pipeline-num-layers", "parallel.num_layers_in_first_pipeline_stage=3",
        "uneven stages: the others share the rest evenly"),
    Row("--decoder-last-pipeline-num-layers", "parallel.num_layers_in_last_pipeline_stage=3"),
    Row("--context-parallel-size", "parallel.context_parallel_size=2"),
    Row("--expert-model-parallel-size", "parallel.expert_model_parallel_size=8"),
    Row("--sequence-parallel", "parallel.sequence_parallel=true"),
    Row("--use-distributed-optimizer", "parallel.use_distributed_optimizer=true"),
    Row("--overlap-grad-reduce", "parallel.overlap_grad_reduce=true"),
    Row("--overlap-param-gather", "parallel.overlap_param_gather=true"),
    Row("--recompute-granularity", "parallel.recompute_granularity=full"),
    Row("--recompute-method", "parallel.recompute_method=uniform"),
    Row("--recompute-num-layers", "parallel.recompute_num_layers=1"),
    Row("--recompute-activations", "parallel.recompute_granularity=selective"),
    Row("--micro-batch-size", "stage.micro_batch_size=1"),
    Row("--global-batch-size", "stage.global_batch_size=128"),
    Row("--train-iters", "stage.train_iters=10000"),
    Row("--train-samples", "stage.train_tokens=10000000000",
        "llmtrain counts tokens: samples x data.seq_length"),
    Row("--exit-interval", "stage.exit_interval=1000",
        "stops with a checkpoint; the same command resumes"),
    Row("--eval-interval", "stage.eval_interval=1000"),
    Row("--eval-iters", "stage.eval_iters=10"),
    Row("--seq-length", "data.seq_length=4096"),
    Row("--data-path",
        "data=indexed data.data_path=[0.7,/data/a_text_document,0.3,/data/b_text_document]"),
    Row("--split", "\"data.split='969,30,1'\""),
    Row("--data-cache-path", "data.data_cache_path=/data/cache"),
    Row("--mock-data", "data=mock"),
    Row("--num-workers", "data.num_workers=2"),
    Row("--reset-position-ids", "data.reset_position_ids=true"),
    Row("--reset-attention-mask", "data.reset_attention_mask=true"),
    Row("--eod-mask-loss", "data.eod_mask_loss=true"),
    Row("--tokenizer-type", "data.tokenizer.tokenizer_type=huggingface",
        "HuggingFaceTokenizer: huggingface, GPT2BPETokenizer: gpt2bpe, SentencePieceTokenizer: "
        "sentencepiece, Llama2Tokenizer: llama2, NullTokenizer: null"),
    Row("--tokenizer-model", "data.tokenizer.tokenizer_model=/models/Meta-Llama-3.1-8B"),
    Row("--vocab-file", "data.tokenizer.vocab_file=/data/gpt2-vocab.json"),
    Row("--merge-file", "data.tokenizer.merge_file=/data/gpt2-merges.txt"),
    Row("--make-vocab-size-divisible-by", "model.make_vocab_size_divisible_by=128"),
    Row("--num-layers", "model=llama3_1_8b",
        "the architecture flags (--hidden-size, --ffn-hidden-size, --num-attention-heads, "
        "--num-query-groups, --max-position-embeddings, --swiglu, --normalization, "
        "--rotary-base, ...) are one conf/model/ entry; single fields as model.num_layers=..."),
    Row("--hidden-size", "model.hidden_size=4096"),
    Row("--ffn-hidden-size", "model.ffn_hidden_size=14336"),
    Row("--num-attention-heads", "model.num_attention_heads=32"),
    Row("--num-query-groups", "model.num_query_groups=8", "--group-query-attention is implied"),
    Row("--max-position-embeddings", "model.max_position_embeddings=131072"),
    Row("--normalization", "model.normalization=RMSNorm"),
    Row("--norm-epsilon", "model.layernorm_epsilon=1e-5"),
    Row("--swiglu", "model.activation=swiglu"),
    Row("--disable-bias-linear", "model.add_bias_linear=false"),
    Row("--add-qkv-bias", "model.add_qkv_bias=true"),
    Row("--position-embedding-type", "model.position_embedding_type=rope"),
    Row("--rotary-base", "model.rotary_base=500000"),
    Row("--untie-embeddings-and-output-weights", "model.share_embeddings_and_output_weights=false"),
    Row("--init-method-std", "model.init_method_std=0.008"),
    Row("--attention-dropout", "model.attention_dropout=0.0"),
    Row("--hidden-dropout", "model.hidden_dropout=0.0"),
    Row("--num-experts", "model.num_moe_experts=8"),
    Row("--moe-router-topk", "model.moe_router_topk=2"),
    Row("--moe-ffn-hidden-size", "model.moe_ffn_hidden_size=2048"),
    Row("--moe-shared-expert-intermediate-size", "model.moe_shared_expert_intermediate_size=2048"),
    Row("--moe-layer-freq", "model.moe_layer_freq=1",
        "Megatron-LM's expression of 0s and 1s, ([0]*3+[1]*58), as a list: [0,0,0,1,...]"),
    Row("--moe-router-topk-scaling-factor", "model.moe_router_topk_scaling_factor=2.5"),
    Row("--multi-latent-attention", "model.multi_latent_attention=true"),
    Row("--q-lora-rank", "model.q_lora_rank=1536"),
    Row("--kv-lora-rank", "model.kv_lora_rank=512"),
    Row("--qk-head-dim", "model.qk_head_dim=128"),
    Row("--qk-pos-emb-head-dim", "model.qk_pos_emb_head_dim=64"),
    Row("--v-head-dim", "model.v_head_dim=128"),
    Row("--rotary-scaling-factor", "model.rotary_scaling_factor=40"),
    Row("--no-yarn-correction-range-round-to-int",
        "model.yarn_correction_range_round_to_int=false", "with model.rope_type=yarn"),
    Row("--window-attn-skip-freq", "model.window_attn_skip_freq=2"),
    Row("--quick-geglu", "model.activation=quick_geglu",
        "its offset and clamp: model.glu_linear_offset=1.0, "
        "model.activation_func_clamp_value=7.0 (gpt-oss)"),
    Row("--bf16", "precision=bf16"),
    Row("--fp16", "precision=fp16"),
    Row("--fp8-format", "precision=fp8",
        "hybrid format, delayed scaling (conf/precision/fp8.yaml)"),
    Row("--loss-scale", "precision.loss_scale=1024"),
    Row("--initial-loss-scale", "precision.initial_loss_scale=65536"),
    Row("--optimizer", "optim.optimizer=adam"),
    Row("--lr", "optim.lr=3e-4"),
    Row("--min-lr", "optim.min_lr=3e-5"),
    Row("--lr-decay-style", "optim.lr_decay_style=cosine"),
    Row("--lr-warmup-iters", "optim.lr_warmup_iters=2000"),
    Row("--lr-decay-iters", "optim.lr_decay_iters=320000"),
    Row("--lr-wsd-decay-iters", "optim.lr_wsd_decay_iters=1000"),
    Row("--weight-decay", "optim.weight_decay=0.1"),
    Row("--adam-beta1", "optim.adam_beta1=0.9"),
    Row("--adam-beta2", "optim.adam_beta2=0.95"),
    Row("--adam-eps", "optim.adam_eps=1e-8"),
    Row("--clip-grad", "optim.clip_grad=1.0"),
    Row("--save", "checkpoint.save=/ckpt/run"),
    Row("--load", "checkpoint.load=/ckpt/llama3_1_8b"),
    Row("--save-interval", "checkpoint.save_interval=1000"),
    Row("--finetune", "checkpoint.finetune=true"),
    Row("--no-load-optim", "checkpoint.finetune=true",
        "weights only, new schedule (--no-load-rng too)"),
    Row("--async-save", "checkpoint.async_save=true"),
    Row("--exit-signal-handler", "checkpoint.exit_signal_handler=true"),
    Row("--log-interval", "logging.log_interval=10"),
    Row("--tensorboard-dir", "logging.tensorboard_dir=tensorboard",
        "relative to the run's folder"),
    Row("--wandb-project", "logging.wandb_project=my_project"),
    Row("--wandb-exp-name", "logging.wandb_exp_name=run1"),
    Row("--seed", "seed=1234"),
    Row("--transformer-impl", "",
        "Transformer Engine's layers on GPUs with llmtrain[gpu], Megatron's local layers on "
        "CPU: chosen, not configured"),
]


# Pai-Megatron-Patch's scripts: positional arguments ($1, $2, ...) by script family. `source` is
# "$N NAME" as the script names it.
PAI_SCRIPTS: dict[str, str] = {
    "run_mcore": "examples/llama3_1/run_mcore_llama3_1.sh (and the other run_mcore_*.sh)",
    "run_pretrain_megatron": "examples/bloom/run_pretrain_megatron_bloom.sh (and the other "
                             "run_pretrain_megatron_*.sh)",
    "run_finetune_megatron": "examples/bloom/run_finetune_megatron_bloom.sh (and the other "
                             "run_finetune_megatron_*.sh)",
    "hf2mcore_convertor": "toolkits/model_checkpoints_convertor/llama/"
                          "hf2mcore_convertor_llama3_1.sh (and the other hf2mcore_convertor_*.sh)",
    "run_text_generation": "examples/llama2/run_text_generation_megatron_llama.sh (and the other "
                           "run_text_generation_megatron_*.sh)",
}

_ENV = Row("$1 ENV", "launcher=local",
           "dsw (one machine): launcher=local; dlc (PAI-DLC, WORLD_SIZE/RANK from the "
           "platform): launcher=dlc")
_MEGATRON = Row("$2 MEGATRON_PATH", "", "not needed: megatron-core is a pinned dependency")
_PATCH = Row("$3 MEGATRON_PATCH_PATH", "", "not needed")
_AC = ("parallel.recompute_granularity=selective",
       "sel: parallel.recompute_granularity=selective; full: parallel.recompute_granularity=full "
       "parallel.recompute_method=uniform parallel.recompute_num_layers=1; offload: "
       "parallel.cpu_offloading=true parallel.cpu_offloading_num_layers=1; none: nothing")
_FL = ("", "not needed: Transformer Engine chooses flash or fused attention")
_SP = ("parallel.sequence_parallel=true", "on by default where TP > 1 with Transformer Engine")
_DO = ("parallel.use_distributed_optimizer=true", "")
_PR = ("precision=bf16", "fp16, bf16, fp8 (a config group)")

PAI_MEGATRON_PATCH: dict[str, list[Row]] = {
    "run_mcore": [
        _ENV,
        Row("$2 MODEL_SIZE", "model=llama3_1_8b", "8B, 70B: one conf/model/ entry per size"),
        Row("$3 BATCH_SIZE", "stage.micro_batch_size=1"),
        Row("$4 GLOBAL_BATCH_SIZE", "stage.global_batch_size=128"),
        Row("$5 LR", "optim.lr=1e-5"),
        Row("$6 MIN_LR", "optim.min_lr=1e-6"),
        Row("$7 SEQ_LEN", "data.seq_length=8192"),
        Row("$8 PAD_LEN", "", "SFT pads to data.seq_length (or packs: data.sft.packing=true)"),
        Row("$9 PR", *_PR),
        Row("$10 TP", "parallel.tensor_model_parallel_size=4"),
        Row("$11 PP", "parallel.pipeline_model_parallel_size=2"),
        Row("$12 CP", "parallel.context_parallel_size=1"),
        Row("$13 SP", *_SP),
        Row("$14 DO", *_DO),
        Row("$15 FL", *_FL),
        Row("$16 SFT", "stage=sft data=sft", "true: fine-tuning on conversations (docs/sft.md)"),
        Row("$17 AC", *_AC),
        Row("$18 OPTIMIZER_OFFLOAD", "parallel.optimizer_cpu_offload=true",
            "static: parallel.optimizer_cpu_offload=true parallel.optimizer_offload_fraction=1.0"),
        Row("$19 SAVE_INTERVAL", "checkpoint.save_interval=1000"),
        Row("$20 DATASET_PATH", "data.data_path=[/data/wudao_llama3_text_document]"),
        Row("$21 VALID_DATASET_PATH", "\"data.split='99,1,0'\"",
            "validation comes from a share of the same prefixes"),
        Row("$22 PRETRAIN_CHECKPOINT_PATH",
            "checkpoint.load=/ckpt/llama3_1_8b checkpoint.finetune=true"),
        Row("$23 TRAIN_TOKENS or TRAIN_ITERS",
            "stage.train_iters=null stage.train_tokens=10000000000",
            "with SFT: stage.train_iters=1000, or stage.epochs=3"),
        Row("$24 WARMUP_TOKENS or WARMUP_ITERS", "optim.lr_warmup_tokens=100000000",
            "with SFT: optim.lr_warmup_iters=10"),
        Row("$25 OUTPUT_BASEPATH", "hydra.run.dir=/runs/llama3_1_8b_cpt",
            "tensorboard/ and checkpoints/ are in the run's folder"),
    ],
    "run_pretrain_megatron": [
        _ENV, _MEGATRON, _PATCH,
        Row("$4 MODEL_SIZE", "model=bloom_7b1", "1.1B, 1.7B, 7.1B: one conf/model/ entry per size"),
        Row("$5 BATCH_SIZE", "stage.micro_batch_size=2"),
        Row("$6 GLOBAL_BATCH_SIZE", "stage.global_batch_size=128"),
        Row("$7 LR", "optim.lr=1e-5"),
        Row("$8 MIN_LR", "optim.min_lr=1e-6"),
        Row("$9 SEQ_LEN", "data.seq_length=2048"),
        Row("$10 EXTRA_VOCAB_SIZE", "data.tokenizer.extra_vocab_size=0",
            "also `python -m llmtrain.data tokenize --extra-vocab-size`"),
        Row("$11 PR", *_PR),
        Row("$12 TP", "parallel.tensor_model_parallel_size=4"),
        Row("$13 PP", "parallel.pipeline_model_parallel_size=2"),
        Row("$14 AC", *_AC),
        Row("$15 DO", *_DO),
        Row("$16 FL", *_FL),
        Row("$17 SP", *_SP),
        Row("$18 SAVE_INTERVAL", "checkpoint.save_interval=1000"),
        Row("$19 DATASET_PATH", "data=indexed data.data_path=[/data/wudao_bloom_text_document]"),
        Row("$20 PRETRAIN_CHECKPOINT_PATH",
            "checkpoint.load=/ckpt/bloom_7b1 checkpoint.finetune=true",
            "none: leave checkpoint.load out (from scratch)"),
        Row("$21 TRAIN_TOKENS", "stage.train_iters=null stage.train_tokens=5000000000"),
        Row("$22 WARMUP_TOKENS", "optim.lr_warmup_tokens=50000000"),
        Row("$23 OUTPUT_BASEPATH", "hydra.run.dir=/runs/bloom_7b1_cpt"),
    ],
    "run_finetune_megatron": [
        _ENV, _MEGATRON, _PATCH,
        Row("$4 MODEL_SIZE", "model=bloom_7b1"),
        Row("$5 BATCH_SIZE", "stage.micro_batch_size=1"),
        Row("$6 LR", "optim.lr=1e-5"),
        Row("$7 MIN_LR", "optim.min_lr=1e-6"),
        Row("$8 SEQ_LEN", "data.seq_length=2048"),
        Row("$9 PAD_LEN", "", "conversations are padded to data.seq_length, or packed"),
        Row("$10 EXTRA_VOCAB_SIZE", "data.tokenizer.extra_vocab_size=0"),
        Row("$11 PR", *_PR),
        Row("$12 TP", "parallel.tensor_model_parallel_size=4"),
        Row("$13 PP", "parallel.pipeline_model_parallel_size=1"),
        Row("$14 AC", *_AC),
        Row("$15 DO", *_DO),
        Row("$16 FL", *_FL),
        Row("$17 SP", *_SP),
        Row("$18 TRAIN_DATASET_PATH", "stage=sft data=sft data.data_path=[/data/instruct.json]"),
        Row("$19 VALID_DATASET_PATH", "\"data.split='98,2,0'\"",
            "validation is a share of the same conversations"),
        Row("$20 PRETRAIN_CHECKPOINT_PATH",
            "checkpoint.load=/ckpt/bloom_7b1 checkpoint.finetune=true"),
        Row("$21 EPOCH", "stage.epochs=2"),
        Row("$22 OUTPUT_BASEPATH", "hydra.run.dir=/runs/bloom_7b1_sft"),
    ],
    "hf2mcore_convertor": [
        Row("$1 MODEL_SIZE", "model=llama3_1_8b", "optional: read from config.json without it",
            command="llmtrain.convert"),
        Row("$2 SOURCE_CKPT_PATH", "input=/models/Meta-Llama-3.1-8B", command="llmtrain.convert"),
        Row("$3 TARGET_CKPT_PATH", "output=/ckpt/llama3_1_8b", command="llmtrain.convert"),
        Row("$4 TP", "tensor_model_parallel_size=1",
            "only the processes of the conversion: the checkpoint loads under any layout",
            command="llmtrain.convert"),
        Row("$5 PP", "pipeline_model_parallel_size=1", "the same", command="llmtrain.convert"),
        Row("$6 mg2hf", "direction=mcore_to_hf", "false: direction=hf_to_mcore (the default)",
            command="llmtrain.convert"),
        Row("$7 CHECK", "check=true", command="llmtrain.convert"),
        Row("$8 CHECK_ONLY", "check_only=true", command="llmtrain.convert"),
        Row("$9 PR", "dtype=bf16", "fp32, bf16, fp16 (the input's by default)",
            command="llmtrain.convert"),
        Row("$10 HF_CKPT_PATH", "tokenizer=/models/Meta-Llama-3.1-8B",
            "mg2hf: where the tokenizer comes from; the config is made from model=",
            command="llmtrain.convert"),
    ],
    "run_text_generation": [
        _ENV,
        Row("$2 MEGATRON_PATCH_PATH", "", "not needed"),
        Row("$3 CHECKPOINT_PATH", "load=/ckpt/llama2_13b", command="llmtrain.generate"),
        Row("$4 MODEL_SIZE", "model=llama2_13b", "optional when the checkpoint says which",
            command="llmtrain.generate"),
        Row("$5 TP", "tensor_model_parallel_size=2", command="llmtrain.generate"),
        Row("$6 BS", "inference_max_batch_size=8", command="llmtrain.generate"),
        Row("$7 SEQ_LEN", "inference_max_seq_length=1024", command="llmtrain.generate"),
        Row("$8 PAD_LEN", "", "not needed: prompts are batched by length"),
        Row("$9 EXTRA_VOCAB_SIZE", "", "read from the checkpoint's model"),
        Row("$10 PR", "dtype=bf16", command="llmtrain.generate"),
        Row("$11 TOP_K", "sampling.top_k=1", command="llmtrain.generate"),
        Row("$12 INPUT_SEQ_LEN", "max_prompt_length=512", command="llmtrain.generate"),
        Row("$13 OUTPUT_SEQ_LEN", "sampling.num_tokens_to_generate=512",
            command="llmtrain.generate"),
        Row("$14 INPUT_FILE", "input=/data/gen.jsonl", command="llmtrain.generate"),
        Row("$15 OUTPUT_FILE", "output=/data/generations.jsonl", command="llmtrain.generate"),
        Row("$16 TOP_P", "sampling.top_p=0.85", command="llmtrain.generate"),
        Row("$17 TEMPERATURE", "sampling.temperature=1.0", command="llmtrain.generate"),
        Row("$18 REPETITION_PENALTY", "sampling.repetition_penalty=1.2",
            command="llmtrain.generate"),
    ],
}


def _cell(text: str) -> str:
    return f"`{text}`" if text else ""


def markdown(rows: list[Row], source_title: str) -> str:
    """A table of `rows` as the migration pages show it."""
    lines = [f"| {source_title} | llmtrain | notes |", "|---|---|---|"]
    for row in rows:
        note = row.note.replace("|", "\\|")
        if row.alias:
            note = "alias; " + note if note else "alias"
        if row.command != "llmtrain":
            note = f"`python -m {row.command}`" + (f"; {note}" if note else "")
        lines.append(f"| {_cell(row.source)} | {_cell(row.override)} | {note} |")
    return "\n".join(lines) + "\n"


ALIASES: dict[str, Row] = {row.source: row for row in MS_SWIFT if row.alias}
_OVERRIDE = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)", re.S)


class AliasError(ValueError):
    """A value an alias cannot translate."""


def _translate(row: Row, value: str) -> str:
    if not row.values:
        return value
    allowed = sorted({*row.values, *_KNOWN_VALUES.get(row.key, ())})
    out = []
    for part in value.split(","):  # a sweep: lr_scheduler_type=cosine,linear
        translated = row.values.get(part, part)
        if translated not in row.values.values() and part not in _KNOWN_VALUES.get(row.key, ()):
            raise AliasError(f"{row.source}={part}: choose one of {', '.join(allowed)} (or set "
                             f"{row.key} directly)")
        out.append(translated)
    return ",".join(out)


# Values an aliased key takes as they are (besides those translated).
_KNOWN_VALUES = {
    "optim.lr_decay_style": ("cosine", "linear", "constant", "inverse-square-root", "WSD"),
    "data.sft.chat_template": ("chatml", "llama3", "tokenizer"),
    "precision": ("bf16", "fp16", "fp32", "fp8"),
}


def rewrite(args: list[str]) -> tuple[list[str], list[str]]:
    """Command-line arguments with ms-swift's names replaced by llmtrain's, and a note per
    rewrite. Only bare `name=value` arguments whose name is an alias change; llmtrain's own
    keys (`optim.lr=`, `seed=`, groups) and Hydra's flags pass through."""
    out, notes = [], []
    for arg in args:
        match = _OVERRIDE.fullmatch(arg)
        row = ALIASES.get(match.group("key")) if match else None
        if row is None:
            out.append(arg)
            continue
        new = f"{row.key}={_translate(row, match.group('value'))}"
        notes.append(f"{arg} -> {new}")
        out.append(new)
    return out, notes
