#!/usr/bin/env bash
# The GPU checklist: the open measurements of docs/ in one command, with the commands users run.
#
#   bash scripts/gpu_checks.sh                      # every step, in this order:
#   bash scripts/gpu_checks.sh convert sft lora generate genbench servebench dpo grpo dapo resume \
#       vpp roles preference served_rm served_critic moe mla sinks grpo_lora
#   GPU_CHECKS_TINY=1 bash scripts/gpu_checks.sh    # the same on a CPU, tiny model (minutes)
#
# Each step writes its whole output to $OUT/<step>.log and prints a few summary lines (also
# kept in $OUT/summary.txt); a failing step prints FAILED with the end of its log and the next
# step runs. Models and runs go to $WORK (not under $OUT: checkpoints are large). Every size
# below can be overridden from the environment (MODEL=qwen2_0_5b SFT_EPOCHS=20 bash ...).
# docs/gpu_checks.md says what each step measures.

SELF=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")
ROOT=$(dirname "$(dirname "$SELF")")
OUT=$(mkdir -p "${OUT:-gpu_checks_out}" && cd "${OUT:-gpu_checks_out}" && pwd) || exit 1
WORK=${WORK:-/tmp/llmtrain_gpu_checks}
export OUT WORK PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
cd "$ROOT" || exit 1

if [ -n "${GPU_CHECKS_TINY:-}" ]; then
    # CPU smoke run: the 5M-parameter `tiny` shape, fp32, short sequences, a few steps.
    : "${MODEL:=tiny}" "${DEVICE:=cpu}" "${PRECISION:=fp32}" "${HF_DTYPE:=fp32}"
    : "${SFT_SEQ:=96}" "${SFT_EPOCHS:=20}" "${SFT_BATCH:=8}" "${SFT_LR:=2e-3}" "${SFT_MIN_LR:=1e-4}"
    : "${GENBENCH_ARGS:=model=tiny --batch-sizes 1,4 --prompt-length 16 --new-tokens 16 --repeats 1}"
    : "${SERVEBENCH_ARGS:=model=tiny --concurrency 1,4 --prompt-length 16 --new-tokens 16}"
    : "${DPO_STEPS:=6}" "${DPO_SEQ:=64}" "${DPO_MICRO:=4}" "${DPO_BATCH:=8}" "${DPO_LR:=1e-4}"
    : "${GRPO_STEPS:=6}" "${GRPO_SEQ:=64}" "${GRPO_MICRO:=16}" "${GRPO_BATCH:=32}"
    : "${GRPO_NEW_TOKENS:=8}" "${GRPO_LR:=5e-3}"
    : "${RUN_MODEL:=tiny}" "${RUN_SEQ:=64}" "${RUN_MICRO:=2}" "${RUN_BATCH:=8}"
    : "${RESUME_STEPS:=8}" "${RESUME_SAVE_AT:=4}" "${VPP_STEPS:=6}" "${STEP_TIMEOUT:=900}"
    : "${LORA_R:=16}" "${LORA_LR:=5e-3}"
    : "${MOE_ARGS:=model=qwen3_30b_a3b model.num_layers=2 model.num_moe_experts=8
        model.hidden_size=256 model.moe_ffn_hidden_size=128 model.num_attention_heads=4}"
    : "${MLA_ARGS:=model=deepseek_v3 model.num_layers=2 model.moe_layer_freq=[0,1]
        model.hidden_size=256 model.ffn_hidden_size=512 model.moe_ffn_hidden_size=64
        model.num_attention_heads=4 model.q_lora_rank=64 model.kv_lora_rank=32
        model.num_moe_experts=16 model.moe_shared_expert_intermediate_size=64}"
    : "${SINKS_ARGS:=model=gpt_oss_20b model.num_layers=2 model.num_moe_experts=8
        model.hidden_size=256 model.ffn_hidden_size=128 model.num_attention_heads=4
        model.num_query_groups=2}"
else
    # One H100: a Llama 3.2 1B-shaped model (the corpus tokenizer's vocabulary: 1.0B
    # parameters), bf16; each step one to three minutes (docs/gpu_checks.md).
    : "${MODEL:=llama3_2_1b}" "${DEVICE:=}" "${PRECISION:=bf16}" "${HF_DTYPE:=bf16}"
    : "${SFT_SEQ:=256}" "${SFT_EPOCHS:=40}" "${SFT_BATCH:=8}" "${SFT_LR:=2e-4}" "${SFT_MIN_LR:=2e-5}"
    : "${GENBENCH_ARGS:=model=llama3_2_1b --batch-sizes 1,32,256 --repeats 3}"
    : "${SERVEBENCH_ARGS:=model=llama3_2_1b --concurrency 1,8,64}"
    : "${DPO_STEPS:=40}" "${DPO_SEQ:=128}" "${DPO_MICRO:=8}" "${DPO_BATCH:=16}" "${DPO_LR:=1e-5}"
    : "${GRPO_STEPS:=30}" "${GRPO_SEQ:=128}" "${GRPO_MICRO:=16}" "${GRPO_BATCH:=64}"
    : "${GRPO_NEW_TOKENS:=16}" "${GRPO_LR:=5e-4}"
    : "${RUN_MODEL:=llama3_2_1b}" "${RUN_SEQ:=2048}" "${RUN_MICRO:=2}" "${RUN_BATCH:=16}"
    : "${RESUME_STEPS:=20}" "${RESUME_SAVE_AT:=10}" "${VPP_STEPS:=20}" "${STEP_TIMEOUT:=450}"
    : "${LORA_R:=16}" "${LORA_LR:=2e-3}"
    : "${MOE_ARGS:=model=qwen3_30b_a3b model.num_layers=2}"  # real width: 128 experts, top-8
    # Real widths, fewer layers and experts (the conversion's check runs on the CPU).
    : "${MLA_ARGS:=model=deepseek_v3 model.num_layers=2 model.moe_layer_freq=[0,1]
        model.num_moe_experts=16}"
    : "${SINKS_ARGS:=model=gpt_oss_20b model.num_layers=2 model.num_moe_experts=8}"
fi
: "${GEN_TOKENS:=48}"  # generated per prompt in the generate step
: "${GRPO_PROMPT:=32}"  # about the chat-templated arithmetic prompts' length, for the peer
: "${GRPO_REWARDS:=stage.alignment.reward_weights.exact_match=1.0 stage.alignment.reward_weights.digits=1.0}"
: "${VPP_SIZE:=2}"    # virtual pipeline stages per pipeline rank in the vpp step

HF="$WORK/hf_$MODEL"          # the Hugging Face stand-in (its folder name is its model name)
MCORE="$WORK/mcore_$MODEL"    # its conversion
SFT_RUN="$WORK/sft_$MODEL"
DEVICE_ARG=()
[ -n "$DEVICE" ] && DEVICE_ARG=("device=$DEVICE")
# Training from the converted model: its config (written by the conversion) and tokenizer, on
# one GPU (GRPO's generation needs data parallel size 1) even where there are more.
FROM_CONVERTED=("hydra.searchpath=[file://$MCORE]" "model=hf_$MODEL"
                "data.tokenizer.tokenizer_type=huggingface" "data.tokenizer.tokenizer_model=$MCORE"
                "precision=$PRECISION" launcher.nproc_per_node=1 "${DEVICE_ARG[@]}")

# A step's summary lines, its arguments or else its input: to the console (fd 3, since a
# step's stdout is its log) and to summary.txt. `command | note` fails the step with the command.
note() {
    local line
    if [ $# -gt 0 ]; then printf '%s\n' "$*"; else cat; fi | while IFS= read -r line; do
        echo "[$CURRENT] $line" | tee -a "$OUT/summary.txt" >&3
    done
}

need_converted() {
    if [ ! -f "$MCORE/latest_checkpointed_iteration.txt" ]; then
        note "no converted model in $MCORE: running the convert step first"
        step_convert
    fi
}

# Whether a step that needs two GPUs can run (on a CPU: as two gloo processes); else a line
# that says it is skipped.
two_gpus() {
    [ "$DEVICE" = cpu ] && return 0
    local gpus
    gpus=$($PY -c "import torch; print(torch.cuda.device_count())")
    if [ "$gpus" -lt 2 ]; then
        note "skipped: $gpus GPU(s) visible, $1 needs 2"
        return 1
    fi
}

# The SFT checkpoint when the sft step has run, else the converted model.
start_checkpoint() {
    if [ -f "$SFT_RUN/checkpoints/latest_checkpointed_iteration.txt" ]; then
        echo "$SFT_RUN/checkpoints"
    else
        echo "$MCORE"
    fi
}

step_convert() {
    rm -rf "$HF" "$MCORE"
    mkdir -p "$WORK"
    $PY scripts/gpu_checks.py hf-model "model=$MODEL" --output "$HF" --dtype "$HF_DTYPE"
    $PY -m llmtrain.convert "input=$HF" "output=$MCORE"
    grep -E '^(check in|logits|top-1)' "$OUT/$CURRENT.log" | tail -n 3 | note
    sed -n 's/^\[convert\] \(done in [^:]*\).*/\1/p' "$OUT/$CURRENT.log" | note
}

step_moe() {
    # docs/convert.md, mixtures of experts: a Qwen3-MoE slice ($MOE_ARGS) with Transformer
    # Engine's grouped experts on a GPU.
    # shellcheck disable=SC2086  # MOE_ARGS is a list of overrides
    round_trip moe $MOE_ARGS
}

step_mla() {
    # A DeepSeek-V3 slice ($MLA_ARGS): multi-latent attention with its query latent on
    # Transformer Engine's layers, sigmoid group-limited routing, a dense first layer.
    # shellcheck disable=SC2086  # MLA_ARGS is a list of overrides
    round_trip mla $MLA_ARGS
}

step_sinks() {
    # A gpt-oss slice ($SINKS_ARGS): attention sinks and the sliding window on every other
    # layer in Transformer Engine's attention, biased clamped experts.
    # shellcheck disable=SC2086  # SINKS_ARGS is a list of overrides
    round_trip sinks $SINKS_ARGS
}

round_trip() {
    # A family's slice (the overrides after the name) from Hugging Face, checked, through one
    # step at learning rate 0 on this machine's layers and back to Hugging Face: the same
    # tensors, bitwise (the expert bias of aux-loss-free balancing moves without a learning
    # rate: its update rate is 0 here).
    local name=$1
    shift
    local hf="$WORK/hf_$name" mcore="$WORK/mcore_$name" run="$WORK/run_$name" back="$WORK/back_$name"
    rm -rf "$hf" "$mcore" "$run" "$back"
    $PY scripts/gpu_checks.py hf-model "$@" --output "$hf" --dtype "$HF_DTYPE"
    $PY -m llmtrain.convert "input=$hf" "output=$mcore"
    grep -E '^(logits|top-1)' "$OUT/$CURRENT.log" | tail -n 2 | note
    $PY -m llmtrain "hydra.searchpath=[file://$mcore]" "model=hf_$name" "checkpoint.load=$mcore" \
        checkpoint.finetune=true data=mock data.seq_length=256 stage.train_iters=1 \
        stage.micro_batch_size=1 stage.global_batch_size=1 optim.lr=0 optim.min_lr=0 \
        optim.lr_warmup_iters=0 model.moe_router_bias_update_rate=0 "precision=$PRECISION" \
        "${DEVICE_ARG[@]}" "hydra.run.dir=$run"
    grep -E '^(model|engine) ' "$OUT/$CURRENT.log" | tail -n 2 | note
    $PY scripts/gpu_checks.py loss "$run" | note
    $PY -m llmtrain.convert direction=mcore_to_hf "input=$run/checkpoints" "output=$back"
    $PY scripts/gpu_checks.py same "$hf" "$back" | note
}

step_sft() {
    need_converted
    rm -rf "$SFT_RUN"
    $PY -m llmtrain "${FROM_CONVERTED[@]}" "checkpoint.load=$MCORE" checkpoint.finetune=true \
        stage=sft data=sft data.sft.model_name=Xiaohuang data.sft.model_author=ModelScope \
        "data.seq_length=$SFT_SEQ" "stage.epochs=$SFT_EPOCHS" \
        "stage.micro_batch_size=$SFT_BATCH" "stage.global_batch_size=$SFT_BATCH" \
        "optim.lr=$SFT_LR" "optim.min_lr=$SFT_MIN_LR" \
        optim.lr_warmup_iters=10 checkpoint.save_interval=0 logging.log_interval=10 \
        "hydra.run.dir=$SFT_RUN"
    grep -E '^model ' "$OUT/$CURRENT.log" | tail -n 1 | note
    grep -m 1 -o 'sft data: .*' "$OUT/$CURRENT.log" | note
    $PY scripts/gpu_checks.py loss "$SFT_RUN" | note
}

step_lora() {
    # The sft step's run with peft=lora on Transformer Engine's layers: its loss, the merged
    # export checked against transformers, the adapters as a PEFT folder, and generation from
    # the adapter checkpoint (the adapters unmerged).
    need_converted
    local run="$WORK/lora_$MODEL"
    rm -rf "$run" "$WORK/lora_merged_$MODEL" "$WORK/lora_peft_$MODEL"
    $PY -m llmtrain "${FROM_CONVERTED[@]}" "checkpoint.load=$MCORE" \
        stage=sft data=sft data.sft.model_name=Xiaohuang data.sft.model_author=ModelScope \
        peft=lora "peft.r=$LORA_R" "data.seq_length=$SFT_SEQ" "stage.epochs=$SFT_EPOCHS" \
        "stage.micro_batch_size=$SFT_BATCH" "stage.global_batch_size=$SFT_BATCH" \
        "optim.lr=$LORA_LR" "optim.min_lr=$LORA_LR" optim.lr_warmup_iters=10 \
        checkpoint.save_interval=0 logging.log_interval=10 "hydra.run.dir=$run"
    grep -m 1 -o 'LoRA: .*' "$OUT/$CURRENT.log" | note
    $PY scripts/gpu_checks.py loss "$run" | note
    $PY -m llmtrain.convert direction=mcore_to_hf "input=$run/checkpoints" \
        "output=$WORK/lora_merged_$MODEL" "tokenizer=$HF"
    grep -E '^(logits|top-1)' "$OUT/$CURRENT.log" | tail -n 2 | note
    $PY -m llmtrain.convert direction=lora_to_peft "input=$run/checkpoints" \
        "output=$WORK/lora_peft_$MODEL"
    note "PEFT folder: $(ls "$WORK/lora_peft_$MODEL" | tr '\n' ' ')"
    printf '%s\n' '{"messages": [{"role": "user", "content": "Who are you?"}]}' \
        > "$WORK/lora_chats.jsonl"
    $PY -m llmtrain.generate "load=$run/checkpoints" "input=$WORK/lora_chats.jsonl" \
        "output=$WORK/lora_answers.jsonl" sampling.greedy=true \
        "sampling.num_tokens_to_generate=$GEN_TOKENS" "${DEVICE_ARG[@]}"
    $PY scripts/gpu_checks.py answers "$WORK/lora_answers.jsonl" | note
}

step_generate() {
    need_converted
    local load
    load=$(start_checkpoint)
    cat > "$WORK/chats.jsonl" <<'EOF'
{"messages": [{"role": "user", "content": "Who are you?"}]}
{"messages": [{"role": "user", "content": "你是谁？"}]}
{"messages": [{"role": "user", "content": "What is your name, and who built you?"}]}
EOF
    $PY -m llmtrain.generate "load=$load" "input=$WORK/chats.jsonl" \
        "output=$WORK/answers.jsonl" sampling.greedy=true \
        "sampling.num_tokens_to_generate=$GEN_TOKENS" "${DEVICE_ARG[@]}"
    note "from $load"
    sed -n 's/^\[generate\] wrote //p' "$OUT/$CURRENT.log" | note
    $PY scripts/gpu_checks.py answers "$WORK/answers.jsonl" | note
}

step_genbench() {
    # shellcheck disable=SC2086  # GENBENCH_ARGS is a list of arguments
    $PY -m llmtrain.generate.bench $GENBENCH_ARGS
    sed -n '/new tokens each/,$p' "$OUT/$CURRENT.log" | note
}

step_dpo() {
    need_converted
    local load
    load=$(start_checkpoint)
    rm -rf "$WORK/dpo_$MODEL"
    $PY scripts/gpu_checks.py pairs --output "$WORK/pairs.jsonl" --count 1000
    $PY -m llmtrain "${FROM_CONVERTED[@]}" "checkpoint.load=$load" checkpoint.finetune=true \
        stage=dpo data=preference "data.data_path=[$WORK/pairs.jsonl]" \
        "data.seq_length=$DPO_SEQ" "stage.train_iters=$DPO_STEPS" \
        "stage.micro_batch_size=$DPO_MICRO" "stage.global_batch_size=$DPO_BATCH" \
        "optim.lr=$DPO_LR" "optim.min_lr=$DPO_LR" stage.alignment.beta=0.1 \
        checkpoint.save=null "hydra.run.dir=$WORK/dpo_$MODEL"
    note "from $load"
    $PY scripts/gpu_checks.py loss "$WORK/dpo_$MODEL" | note
    $PY scripts/gpu_checks.py metrics "$WORK/dpo_$MODEL" margin accuracy reward_chosen \
        reward_rejected kl | note
}

step_grpo() {
    grpo_run grpo
    # The rollout's peer, in the same run: transformers' `generate` (and the decode engine
    # alone) at the step's batch, a prompt of about the rollout's length, its reply length.
    $PY -m llmtrain.generate.bench "model=$MODEL" --batch-sizes "$GRPO_BATCH" \
        --prompt-length "$GRPO_PROMPT" --new-tokens "$GRPO_NEW_TOKENS" --repeats 1
    sed -n '/new tokens each/,$p' "$OUT/$CURRENT.log" | note
}

step_grpo_lora() {
    # The grpo run with peft=lora: the reference is the base with the adapters off, and the
    # rollouts run the adapters unmerged in the decode engine (tokens/s beside the grpo step's).
    grpo_run grpo_lora peft=lora "peft.r=$LORA_R"
}

step_dapo() {
    # docs/rlhf.md's DAPO: decoupled clip range, token-level loss, dynamic sampling, overlong
    # shaping.
    grpo_run dapo stage.alignment.clip_ratio_low=0.2 stage.alignment.clip_ratio_high=0.28 \
        stage.alignment.loss_agg_mode=token-mean stage.alignment.filter_groups=true \
        stage.alignment.overlong_buffer_len=4
}

grpo_run() {
    # From the converted model: its random replies hold some digits for the digits rule to
    # reward, while the SFT model answers every sum with its name (reward 0, nothing to learn).
    # GRPO_REWARDS names the rules (the math verifier: reward_weights.math).
    local name=$1 run="$WORK/$1_$MODEL"
    shift
    need_converted
    rm -rf "$run"
    # shellcheck disable=SC2086  # GRPO_REWARDS is a list of overrides
    $PY -m llmtrain "${FROM_CONVERTED[@]}" "checkpoint.load=$MCORE" checkpoint.finetune=true \
        stage=grpo data=prompts "data.seq_length=$GRPO_SEQ" "stage.train_iters=$GRPO_STEPS" \
        "stage.micro_batch_size=$GRPO_MICRO" "stage.global_batch_size=$GRPO_BATCH" \
        stage.alignment.group_size=8 "stage.alignment.max_new_tokens=$GRPO_NEW_TOKENS" \
        $GRPO_REWARDS "optim.lr=$GRPO_LR" "optim.min_lr=$GRPO_LR" checkpoint.save=null \
        "$@" "hydra.run.dir=$run"
    note "from $MCORE"
    $PY scripts/gpu_checks.py loss "$run" | note
    $PY scripts/gpu_checks.py metrics "$run" reward kl entropy reply_length \
        seconds_rollout seconds_reward seconds_logprobs seconds_update rollout_tokens_per_second \
        | note
}

step_servebench() {
    # shellcheck disable=SC2086  # SERVEBENCH_ARGS is a list of arguments
    $PY -m llmtrain.serve.bench $SERVEBENCH_ARGS
    sed -n '/streamed tokens per request/,$p' "$OUT/$CURRENT.log" | note
}

# Pretraining on the embedded corpus, shared by the resume and vpp steps.
pretrain_args() {
    echo "model=$RUN_MODEL" "precision=$PRECISION" data=corpus "data.seq_length=$RUN_SEQ" \
        "stage.micro_batch_size=$RUN_MICRO" "stage.global_batch_size=$RUN_BATCH" \
        optim.lr_warmup_iters=2 stage.eval_interval=0 "${DEVICE_ARG[@]}"
}

step_resume() {
    # docs/reliability.md, "Exactness on GPU": A and B never stop, C continues A from its
    # checkpoint of step RESUME_SAVE_AT; C - A is the resume's error, B - A the run-to-run noise.
    local runs="$WORK/resume"
    # shellcheck disable=SC2207
    local args=($(pretrain_args) "stage.train_iters=$RESUME_STEPS" launcher.nproc_per_node=1)
    rm -rf "$runs"
    df -h "$WORK"
    $PY -m llmtrain "${args[@]}" "checkpoint.save_interval=$RESUME_SAVE_AT" \
        checkpoint.save_on_exit=false "hydra.run.dir=$runs/a"
    $PY -m llmtrain "${args[@]}" checkpoint.save=null "hydra.run.dir=$runs/b"
    $PY -m llmtrain "${args[@]}" "checkpoint.load=$runs/a/checkpoints" \
        "checkpoint.load_step=$RESUME_SAVE_AT" checkpoint.save=null "hydra.run.dir=$runs/c"
    note "$RUN_MODEL, $PRECISION, sequence $RUN_SEQ, global batch $RUN_BATCH; run A:"
    $PY scripts/gpu_checks.py loss "$runs/a" | note
    $PY scripts/gpu_checks.py resume "$runs/a" "$runs/b" "$runs/c" | note
    rm -rf "$runs"  # two checkpoints with optimizer state: 35 GB for Llama 3.2 1B
}

step_vpp() {
    # docs/performance.md, "Layouts on two H200s agree with one GPU": PP=2 with virtual pipeline
    # stages against one GPU and plain PP=2. On a CPU the layouts run as gloo processes.
    two_gpus "PP=2" || return 0
    # shellcheck disable=SC2046
    $PY -m llmtrain.bench.layouts --layout "launcher.nproc_per_node=1" \
        --layout "parallel=tp1pp2" \
        --layout "parallel=tp1pp2 parallel.virtual_pipeline_model_parallel_size=$VPP_SIZE" \
        -- $(pretrain_args) "stage.train_iters=$VPP_STEPS" checkpoint.save=null
    note "reference, PP=2, PP=2 x VPP=$VPP_SIZE ($RUN_MODEL, sequence $RUN_SEQ, $VPP_STEPS steps):"
    sed -n '/^layout /,$p' "$OUT/$CURRENT.log" | note
}

step_roles() {
    # docs/rlhf.md, "Each role's layout": PPO under TP=2 with its critic and reference on TP=1
    # layouts of their own, against the same roles on the run's layout. In fp32, where the two
    # agree to rounding: a role that reached for the run's process groups (as Megatron's fused
    # MLP did) leaves a KL of 1e-2 at step 1, where the reference equals the policy.
    two_gpus "TP=2" || return 0
    $PY -m llmtrain.bench.layouts --metric kl --metric value_loss --metric reward \
        --layout "" --layout "stage.alignment.critic_tensor_model_parallel_size=1
        stage.alignment.reference_tensor_model_parallel_size=1" \
        -- model=tiny precision=fp32 parallel=tp2pp1 launcher.nproc_per_node=2 stage=ppo \
        data=prompts data.seq_length=64 stage.train_iters=3 stage.micro_batch_size=4 \
        stage.global_batch_size=8 stage.alignment.max_new_tokens=8 \
        stage.alignment.reward_weights.digits=1.0 checkpoint.save=null "${DEVICE_ARG[@]}"
    note "PPO, tiny, fp32, TP=2: roles on the run's layout, then critic and reference on TP=1:"
    sed -n '/^layout /,$p' "$OUT/$CURRENT.log" | note
}

step_preference() {
    # docs/rlhf.md, "Each role's layout": the reward model and DPO under TP=2 (with sequence
    # parallelism, the GPU default for TP > 1) against one GPU, in fp32.
    two_gpus "TP=2" || return 0
    $PY scripts/gpu_checks.py pairs --output "$WORK/pairs.jsonl" --count 1000
    for stage in rm dpo; do
        $PY -m llmtrain.bench.layouts --metric margin --metric accuracy \
            --layout "launcher.nproc_per_node=1" \
            --layout "parallel=tp2pp1 launcher.nproc_per_node=2" \
            -- model=tiny precision=fp32 "stage=$stage" data=preference \
            "data.data_path=[$WORK/pairs.jsonl]" data.seq_length=64 stage.train_iters=4 \
            stage.micro_batch_size=4 stage.global_batch_size=8 checkpoint.save=null \
            "${DEVICE_ARG[@]}" | tee "$WORK/preference_$stage.txt"
        note "stage=$stage, tiny, fp32, 4 steps: one GPU, then TP=2:"
        sed -n '/^layout /,$p' "$WORK/preference_$stage.txt" | note
    done
}

ready_url() {
    # The address a server ($2, logging to $1) prints once it is ready; its log if it stops.
    local url=""
    for _ in $(seq 300); do
        url=$(sed -n 's/^\[[a-z]*\] ready: \(http[^ ]*\).*/\1/p' "$1")
        [ -n "$url" ] || ! kill -0 "$2" 2> /dev/null && break
        sleep 1
    done
    [ -n "$url" ] || { cat "$1" >&2; return 1; }
    echo "$url"
}

step_served_rm() {
    # docs/rlhf.md, "Rewards from a server": a stage=rm model served by llmtrain.serve on the
    # second GPU scores GRPO on the first (reward=remote); the rewards must equal the same
    # model's loaded on the training GPU (reward=model).
    two_gpus "a server beside the run" || return 0
    local runs="$WORK/served_rm" url=""
    rm -rf "$runs" && mkdir -p "$runs"
    $PY scripts/gpu_checks.py pairs --output "$WORK/pairs.jsonl" --count 1000
    $PY -m llmtrain model=tiny precision=fp32 stage=rm data=preference \
        "data.data_path=[$WORK/pairs.jsonl]" data.seq_length=64 stage.train_iters=20 \
        stage.micro_batch_size=4 stage.global_batch_size=8 optim.lr=1e-3 optim.min_lr=1e-3 \
        launcher.nproc_per_node=1 "hydra.run.dir=$runs/rm" "${DEVICE_ARG[@]}"
    CUDA_VISIBLE_DEVICES=1 $PY -m llmtrain.serve "load=$runs/rm/checkpoints" dtype=fp32 port=0 \
        "${DEVICE_ARG[@]}" > "$runs/serve.log" 2>&1 &
    local server=$!
    trap 'kill $server 2> /dev/null' EXIT  # a failing command must not leave it serving
    url=$(ready_url "$runs/serve.log" $server) || return 1
    local grpo=(model=tiny precision=fp32 stage=grpo data=prompts data.seq_length=64
                stage.train_iters=3 stage.micro_batch_size=8 stage.global_batch_size=16
                stage.alignment.max_new_tokens=8 launcher.nproc_per_node=1 checkpoint.save=null
                "${DEVICE_ARG[@]}")
    CUDA_VISIBLE_DEVICES=0 $PY -m llmtrain "${grpo[@]}" stage.alignment.reward=model \
        "stage.alignment.reward_load=$runs/rm/checkpoints" "hydra.run.dir=$runs/local"
    CUDA_VISIBLE_DEVICES=0 $PY -m llmtrain "${grpo[@]}" stage.alignment.reward=remote \
        "stage.alignment.reward_url=$url/v1/rewards" "hydra.run.dir=$runs/served"
    note "GRPO, tiny, fp32: A the reward model on the training GPU, B served on the other:"
    $PY scripts/gpu_checks.py compare "$runs/local" "$runs/served" reward kl | note
    kill -TERM $server && wait $server
    trap - EXIT
    tail -n 2 "$runs/serve.log"
}

step_served_critic() {
    # docs/rlhf.md, "The critic on ranks of its own": PPO's critic served by
    # llmtrain.serve.critic on the second GPU trains in step with the actor on the first; the
    # run must follow the run whose critic is on the training GPU.
    two_gpus "a critic server beside the run" || return 0
    local runs="$WORK/served_critic" url=""
    rm -rf "$runs" && mkdir -p "$runs"
    local ppo=(model=tiny precision=fp32 stage=ppo data=prompts data.seq_length=64
               stage.train_iters=4 stage.micro_batch_size=8 stage.global_batch_size=16
               stage.alignment.max_new_tokens=8 stage.alignment.critic_lr=1e-3
               stage.alignment.reward_weights.digits=1.0
               checkpoint.save_interval=2 launcher.nproc_per_node=1 "${DEVICE_ARG[@]}")
    # CRITIC_GPUS="0,1" CRITIC_LAYOUT="parallel=tp1pp2 launcher.nproc_per_node=2": the critic
    # with a layout of its own, on GPUs it shares with the actor.
    # shellcheck disable=SC2086
    CUDA_VISIBLE_DEVICES=${CRITIC_GPUS:-1} $PY -m llmtrain.serve.critic "${ppo[@]}" \
        "hydra.run.dir=$runs/served" stage.alignment.critic_url=http://127.0.0.1:0 \
        ${CRITIC_LAYOUT:-} > "$runs/critic.log" 2>&1 &
    local server=$!
    trap 'kill $server 2> /dev/null' EXIT
    url=$(ready_url "$runs/critic.log" $server) || return 1
    CUDA_VISIBLE_DEVICES=0 $PY -m llmtrain "${ppo[@]}" "hydra.run.dir=$runs/local"
    CUDA_VISIBLE_DEVICES=0 $PY -m llmtrain "${ppo[@]}" "stage.alignment.critic_url=$url" \
        "hydra.run.dir=$runs/served"
    note "PPO, tiny, fp32: A the critic on the training GPU, B served:" \
        "$(grep -o 'serves the critic.*' "$runs/critic.log")"
    $PY scripts/gpu_checks.py compare "$runs/local" "$runs/served" value_loss reward kl | note
    ls "$runs/served/checkpoints/critic" | note
    kill -TERM $server && wait $server
    trap - EXIT
    tail -n 3 "$runs/critic.log"
}

ALL_STEPS=(convert sft lora generate genbench servebench dpo grpo dapo resume vpp roles
           preference served_rm served_critic moe mla sinks grpo_lora)
if [ "${1:-}" = --step ]; then
    # One step in its own process, as the loop below runs each: it stops at its first failing
    # command, and `timeout` can end it with everything it started.
    CURRENT=$2
    set -euo pipefail
    "step_$2"
    exit
fi
STEPS=("${ALL_STEPS[@]}")
[ $# -gt 0 ] && STEPS=("$@")
for name in "${STEPS[@]}"; do
    if ! declare -F "step_$name" > /dev/null; then
        echo "gpu_checks: no step $name; the steps: ${ALL_STEPS[*]}" >&2
        exit 2
    fi
done

mkdir -p "$WORK"
: > "$OUT/summary.txt"
exec 3>&1
failed=()
began_all=$SECONDS
CURRENT=all
note "${STEPS[*]}: model $MODEL, $PRECISION, device ${DEVICE:-default}; logs in $OUT, runs in $WORK"
$PY scripts/gpu_checks.py machine 2>&1 | note
for name in "${STEPS[@]}"; do
    CURRENT=$name
    began=$SECONDS
    timeout -k 30 "$STEP_TIMEOUT" bash "$SELF" --step "$name" > "$OUT/$name.log" 2>&1
    code=$?
    if [ $code -eq 0 ]; then
        note "ok in $((SECONDS - began)) s"
        continue
    fi
    failed+=("$name")
    if [ $code -eq 124 ]; then
        note "FAILED: stopped after STEP_TIMEOUT=$STEP_TIMEOUT s; the end of $OUT/$name.log:"
    else
        note "FAILED (exit $code) after $((SECONDS - began)) s; the end of $OUT/$name.log:"
    fi
    tail -n 20 "$OUT/$name.log" | sed 's/^/    /' | note
done
CURRENT=all
note "${#STEPS[@]} step(s) in $((SECONDS - began_all)) s; failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
