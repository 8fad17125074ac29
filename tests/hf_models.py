"""Tiny random Hugging Face models of every supported family, built with transformers' own
classes and saved as transformers saves them (the tests download nothing)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

VOCAB = 256


def _config(kind: str):
    from transformers import (
        BloomConfig,
        DeepseekV2Config,
        DeepseekV3Config,
        FalconConfig,
        Glm4MoeConfig,
        GlmConfig,
        GPT2Config,
        GptOssConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Qwen2Config,
        Qwen2MoeConfig,
        Qwen3Config,
        Qwen3MoeConfig,
    )

    small = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                 max_position_embeddings=128)
    llama = dict(small, vocab_size=VOCAB, intermediate_size=160, num_key_value_heads=2)
    deepseek = dict(small, vocab_size=VOCAB, intermediate_size=160, num_key_value_heads=4,
                    moe_intermediate_size=32, n_routed_experts=8, first_k_dense_replace=1,
                    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 32, "mscale": 0.707,
                                     "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1})
    return {
        # Llama 3.1-style RoPE scaling, grouped-query attention, separate output layer.
        "llama": lambda: LlamaConfig(**llama, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        # Q/K/V biases and tied embeddings (the small Qwen2/2.5 sizes).
        "qwen2": lambda: Qwen2Config(**llama, tie_word_embeddings=True),
        # A sliding window shorter than the check's prompts.
        "mistral": lambda: MistralConfig(**llama, sliding_window=8),
        "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4,
                                   n_positions=128),
        "bloom": lambda: BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=4, n_head=4),
        # Falcon 7B's layout: parallel attention and MLP, one shared norm, one KV head.
        "falcon": lambda: FalconConfig(vocab_size=VOCAB, **small, multi_query=True,
                                       parallel_attn=True, bias=False),
        # Falcon 40B's layout: a norm each for attention and MLP, grouped-query attention.
        "falcon40b": lambda: FalconConfig(vocab_size=VOCAB, **dict(small, num_attention_heads=8),
                                          num_kv_heads=2, new_decoder_architecture=True),
        # GLM-4: RoPE on interleaved pairs of half the channels, Q/K/V biases, fused gate/up.
        # Qwen3: Q/K norms, a head size (32) that is not hidden / heads (16), tied embeddings.
        "qwen3": lambda: Qwen3Config(**llama, head_dim=32, tie_word_embeddings=True),
        "glm": lambda: GlmConfig(**llama, head_dim=16, partial_rotary_factor=0.5,
                                 pad_token_id=None),
        # Mixtures of experts: 4 experts, 2 per token. Mixtral: softmax over the two chosen.
        "mixtral": lambda: MixtralConfig(**llama, num_local_experts=4, num_experts_per_tok=2),
        # Qwen3-MoE: Q/K norms, experts narrower than intermediate_size, renormalised top-k.
        "qwen3_moe": lambda: Qwen3MoeConfig(**llama, head_dim=32, num_experts=4,
                                            num_experts_per_tok=2, moe_intermediate_size=96,
                                            norm_topk_prob=True),
        # Qwen2-MoE: softmax over all experts, not renormalised, a gated shared expert, and a
        # dense layer among the MoE ones (mlp_only_layers).
        "qwen2_moe": lambda: Qwen2MoeConfig(**llama, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=96,
                                            shared_expert_intermediate_size=128,
                                            mlp_only_layers=[2]),
        # DeepSeek: a dense first layer, then 8 routed experts (4 per token) and a shared one;
        # multi-latent attention with YaRN. V3: the query through its latent, sigmoid scores
        # with the expert bias, 2 of 4 groups, scaled weights. V2: the query straight from the
        # hidden state (V2-Lite), top 2 of a softmax over all, two shared experts.
        "deepseek_v3": lambda: DeepseekV3Config(**deepseek, q_lora_rank=32, n_shared_experts=1,
                                                num_experts_per_tok=4, n_group=4, topk_group=2,
                                                routed_scaling_factor=2.5),
        "deepseek_v2": lambda: DeepseekV2Config(**deepseek, q_lora_rank=None, n_shared_experts=2,
                                                num_experts_per_tok=2, topk_method="greedy"),
        # gpt-oss: attention sinks, a window of 8 on layers 0 and 2, YaRN unrounded (with its
        # attention factor), biases everywhere, 4 experts (2 per token) with the clamped gated
        # unit, stored stacked (their inputs a multiple of 32 wide, as MXFP4 needs).
        "gpt_oss": lambda: GptOssConfig(
            **dict(llama, intermediate_size=96), head_dim=16, num_local_experts=4,
            num_experts_per_tok=2, sliding_window=8,
            rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                             "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 32}),
        # GLM-4.5: grouped-query attention with Q/K/V biases and Q/K norms, RoPE on half of
        # each head (two halves), a dense first layer, DeepSeek-V3's routing (1 of 2 groups).
        "glm4_moe": lambda: Glm4MoeConfig(**llama, head_dim=16, partial_rotary_factor=0.5,
                                          attention_bias=True, use_qk_norm=True,
                                          moe_intermediate_size=32, n_routed_experts=8,
                                          n_shared_experts=1, num_experts_per_tok=2, n_group=2,
                                          topk_group=1, first_k_dense_replace=1,
                                          routed_scaling_factor=2.5, pad_token_id=None),
    }[kind]()


MOE = ("mixtral", "qwen3_moe", "qwen2_moe", "deepseek_v3", "deepseek_v2", "gpt_oss", "glm4_moe")
FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "bloom", "falcon", "falcon40b", "glm",
            "qwen3", *MOE)


def _train(model, steps: int = 2) -> None:
    """A few optimizer steps on random tokens: a MoE model's routers and experts then differ from
    their initialisation, as in a trained checkpoint."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        ids = torch.randint(model.config.vocab_size, (2, 16))
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def tiny_hf(kind: str, folder: Path, dtype: torch.dtype = torch.float32,
            tokenizer: bool = False, seed: int = 0) -> Path:
    """A random model of `kind` saved under `folder`; norms and biases are perturbed too, so
    that a mapping mistake on them shows. With `tokenizer`, the embedded corpus' BPE tokenizer
    is saved beside it (the model's vocabulary is then the tokenizer's)."""
    from transformers import AutoModelForCausalLM

    config = _config(kind)
    if tokenizer:
        from tokenizers import Tokenizer

        from llmtrain.data.corpus import corpus_tokenizer_path

        corpus = Tokenizer.from_file(str(corpus_tokenizer_path()))
        config.vocab_size = corpus.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln" in name or name.endswith(("bias", "sinks")):
                param.add_(torch.randn_like(param) * 0.1)
        for name, buffer in model.named_buffers():  # DeepSeek-V3's expert bias is a buffer
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.1)
    if kind in MOE:
        _train(model)
    model.to(dtype).save_pretrained(str(folder))
    if tokenizer:
        shutil.copy(corpus_tokenizer_path(), Path(folder) / "tokenizer.json")
    return Path(folder)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face folder (single file or sharded)."""
    from safetensors.torch import load_file

    result = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        result.update(load_file(str(file)))
    return result


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
