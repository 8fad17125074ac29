"""The model zoo (conf/model/) holds the published architectures: each entry has exactly the
parameter count its publisher states, validates, and is what its Hugging Face config says."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from conftest import compose_config
from llmtrain.cli import CONF_DIR
from llmtrain.config.layout import Machine
from llmtrain.config.plan import count_parameters, describe, memory_plan
from llmtrain.config.schema import ModelConfig
from llmtrain.config.validate import ConfigError, validate
from llmtrain.convert import families
from llmtrain.convert.plan import differences

# Parameters as published (model cards, the safetensors index of the Hub checkpoints), counted
# over the real vocabulary (Megatron's padding excluded).
PUBLISHED = {
    "gpt2": 124_439_808, "gpt2_345m": 354_823_168, "gpt2_large": 774_030_080,
    "gpt2_xl": 1_557_611_200,
    "llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320, "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248, "llama3_1_8b": 8_030_261_248, "llama3_70b": 70_553_706_496,
    "llama3_1_70b": 70_553_706_496, "llama3_2_1b": 1_235_814_400, "llama3_2_3b": 3_212_749_824,
    "mistral_7b": 7_241_732_096, "mistral_7b_v0_3": 7_248_023_552,
    "qwen2_0_5b": 494_032_768, "qwen2_1_5b": 1_543_714_304, "qwen2_7b": 7_615_616_512,
    "qwen2_5_0_5b": 494_032_768, "qwen2_5_1_5b": 1_543_714_304, "qwen2_5_3b": 3_085_938_688,
    "qwen2_5_7b": 7_615_616_512, "qwen2_5_14b": 14_770_033_664, "qwen2_5_32b": 32_763_876_352,
    "qwen2_5_72b": 72_706_203_648,
    "bloom_560m": 559_214_592, "bloom_1b7": 1_722_408_960, "bloom_7b1": 7_069_016_064,
    "bloom_176b": 176_247_271_424,
    "falcon_7b": 6_921_720_704, "falcon_40b": 41_303_293_952,
    # Qwen3 counted once where tied (the Hub's 0.6B and 1.7B files store the output layer too:
    # their 752M and 2.03B count it twice).
    "qwen3_0_6b": 596_049_920, "qwen3_1_7b": 1_720_574_976, "qwen3_4b": 4_022_468_096,
    "qwen3_8b": 8_190_735_360, "qwen3_14b": 14_768_307_200, "qwen3_32b": 32_762_123_264,
    # Mixtures of experts: every expert counted (the Hub index's total_size / 2 bytes in bf16),
    # the shared expert and its gate too (Qwen1.5-MoE).
    "mixtral_8x7b": 46_702_792_704, "qwen1_5_moe_a2_7b": 14_315_784_192,
    "qwen3_30b_a3b": 30_532_122_624, "qwen3_235b_a22b": 235_093_634_560,
    # DeepSeek: the Hub's 685B for V3 holds the multi-token-prediction layer too (and the
    # routers' expert biases, buffers rather than parameters), the published 671B does not.
    "deepseek_v3": 671_026_404_352, "deepseek_v2_lite": 15_706_484_224,
    # gpt-oss: the model card's 20.91B and 116.83B, exactly what transformers' model of the
    # published config.json holds (attention sinks, router and expert biases included).
    "gpt_oss_20b": 20_914_757_184, "gpt_oss_120b": 116_829_156_672,
    # GLM-4.5: without the multi-token-prediction layer (as transformers builds it).
    "glm4_5": 352_797_814_784, "glm4_5_air": 106_852_245_504,
}
# Entries added with conversion (the others came with training and its tests).
CONVERSION_ZOO = (
    "gpt2", "gpt2_large", "gpt2_xl", "llama2_7b", "llama2_13b", "llama2_70b", "llama3_1_70b",
    "llama3_2_3b", "mistral_7b", "mistral_7b_v0_3", "qwen2_0_5b", "qwen2_1_5b", "qwen2_5_0_5b",
    "qwen2_5_1_5b", "qwen2_5_3b", "qwen2_5_7b", "qwen2_5_14b", "qwen2_5_32b", "qwen2_5_72b",
    "bloom_560m", "bloom_1b7", "bloom_7b1", "bloom_176b", "falcon_7b", "falcon_40b",
    "qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b",
    "qwen3_30b_a3b", "qwen3_235b_a22b", "deepseek_v3", "deepseek_v2_lite", "gpt_oss_20b",
    "gpt_oss_120b", "glm4_5", "glm4_5_air")
ZOO = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("*.yaml"))
# Published models (each of a family with a Hugging Face mapping), not the tiny test models.
PUBLISHED_ZOO = [name for name in ZOO if name not in ("tiny", "tiny_moe")]
CPU = Machine(gpus=0, has_transformer_engine=False)


def _model(name: str) -> ModelConfig:
    return compose_config(f"model={name}").model


def test_every_published_model_is_in_the_zoo():
    assert sorted(PUBLISHED) == PUBLISHED_ZOO
    assert set(CONVERSION_ZOO) <= set(ZOO)
    # Each is a named size of one family.
    assert sorted(size for f in families.registered() for size in f.sizes) == PUBLISHED_ZOO


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_is_the_published_one(name):
    m = _model(name)
    assert m.name == name
    family = families.by_name(m.family)
    assert name in family.sizes
    assert {key: getattr(m, key) for key in family.defaults} == family.defaults
    assert family.parameters(m) == count_parameters(m, m.vocab_size).total == PUBLISHED[name]


@pytest.mark.parametrize("name", ZOO)
def test_entry_validates_for_a_cpu_run(name):
    validate(compose_config(f"model={name}"), CPU)


# Heads that TP=2 does not divide, layers that PP=2 does not.
NOT_TP2 = {"falcon_7b": 71, "gpt2_xl": 25}
NOT_PP2 = {"deepseek_v3": 61, "deepseek_v2_lite": 27}
# Experts with biases: Megatron-Core splits them over no tensor-parallel ranks.
NO_TP = ("gpt_oss_20b", "gpt_oss_120b")


@pytest.mark.parametrize("name", CONVERSION_ZOO)
def test_entry_under_tp2_pp2(name):
    cfg = compose_config(f"model={name}", "parallel=tp2pp2")
    if name in NO_TP:
        with pytest.raises(ConfigError) as error:
            validate(cfg, CPU)
        assert error.value.problems == [
            f"model {name} has experts with biases (add_bias_linear), which Megatron-Core splits "
            f"over no tensor-parallel ranks (expert tensor parallel size 1), and llmtrain splits "
            f"experts as it splits the rest: use tensor_model_parallel_size=1, not 2 (spread the "
            f"experts with expert_model_parallel_size)"]
        validate(compose_config(f"model={name}", "parallel=tp1pp2"), CPU)
        return
    if name not in NOT_TP2 and name not in NOT_PP2:
        validate(cfg, CPU)
        return
    with pytest.raises(ConfigError) as error:
        validate(cfg, CPU)
    assert error.value.problems == [
        f"model {name} has {NOT_TP2[name]} attention heads, which tensor parallel size 2 does not "
        f"divide: choose a TP that divides it"] if name in NOT_TP2 else [
        f"model {name} has {NOT_PP2[name]} layers, which pipeline parallel size 2 does not divide: "
        f"choose a layout whose stages divide the layers, or give the first and last stages counts "
        f"of their own (parallel.num_layers_in_first_pipeline_stage, parallel.num_layers_in_last_"
        f"pipeline_stage)"]
    if name in NOT_PP2:  # the first stage one layer more: the rest splits evenly
        validate(compose_config(f"model={name}", "parallel=tp2pp2",
                                "parallel.num_layers_in_first_pipeline_stage="
                                f"{NOT_PP2[name] // 2 + 1}"), CPU)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_hugging_face_config_expresses_the_entry_exactly(name):
    m = _model(name)
    family = families.by_name(m.family)
    hf_config = family.hf_config(m)
    assert hf_config.model_type == family.model_type
    assert differences(m, ModelConfig(name=name, **family.model_fields(hf_config))) == []


# config.json of Hub checkpoints, as published (the fields that describe the architecture).
HUB_CONFIGS = {
    "llama3_2_1b": ("LlamaConfig", {
        "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 8192,
        "max_position_embeddings": 131072, "num_attention_heads": 32, "num_hidden_layers": 16,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "vocab_size": 128256}),
    "llama2_7b": ("LlamaConfig", {
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
        "max_position_embeddings": 4096, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "tie_word_embeddings": False, "vocab_size": 32000}),
    "mistral_7b": ("MistralConfig", {
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "sliding_window": 4096, "tie_word_embeddings": False, "vocab_size": 32000}),
    "qwen2_5_0_5b": ("Qwen2Config", {
        "hidden_act": "silu", "hidden_size": 896, "intermediate_size": 4864,
        "max_position_embeddings": 32768, "max_window_layers": 24, "num_attention_heads": 14,
        "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "use_sliding_window": False, "vocab_size": 151936}),
    # Head size 128 on a hidden size of 1024 (16 heads: 2048 query channels), Q/K norms.
    "qwen3_0_6b": ("Qwen3Config", {
        "attention_bias": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": True, "use_sliding_window": False, "vocab_size": 151936}),
    "qwen3_32b": ("Qwen3Config", {
        "attention_bias": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
        "intermediate_size": 25600, "max_position_embeddings": 40960, "max_window_layers": 64,
        "num_attention_heads": 64, "num_hidden_layers": 64, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000, "sliding_window": None,
        "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 151936}),
    "mixtral_8x7b": ("MixtralConfig", {
        "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
        "max_position_embeddings": 32768, "num_attention_heads": 32, "num_experts_per_tok": 2,
        "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "rms_norm_eps": 1e-05, "rope_theta": 1e6, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "vocab_size": 32000}),
    "qwen1_5_moe_a2_7b": ("Qwen2MoeConfig", {
        "decoder_sparse_step": 1, "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 5632, "max_position_embeddings": 8192, "moe_intermediate_size": 1408,
        "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60,
        "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 5632, "tie_word_embeddings": False,
        "use_sliding_window": False, "vocab_size": 151936}),
    "qwen3_30b_a3b": ("Qwen3MoeConfig", {
        "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
        "mlp_only_layers": [], "moe_intermediate_size": 768, "norm_topk_prob": True,
        "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
        "use_sliding_window": False, "vocab_size": 151936}),
    "qwen3_235b_a22b": ("Qwen3MoeConfig", {
        "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 12288, "max_position_embeddings": 40960,
        "mlp_only_layers": [], "moe_intermediate_size": 1536, "norm_topk_prob": True,
        "num_attention_heads": 64, "num_experts": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 94, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "tie_word_embeddings": False,
        "use_sliding_window": False, "vocab_size": 151936}),
    "deepseek_v3": ("DeepseekV3Config", {
        "attention_bias": False, "first_k_dense_replace": 3, "hidden_act": "silu",
        "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "n_group": 8,
        "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
        "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "tie_word_embeddings": False,
        "topk_group": 4, "v_head_dim": 128, "vocab_size": 129280}),
    "deepseek_v2_lite": ("DeepseekV2Config", {
        "attention_bias": False, "first_k_dense_replace": 1, "hidden_act": "silu",
        "hidden_size": 2048, "intermediate_size": 10944, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "n_group": 1,
        "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
        "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "tie_word_embeddings": False,
        "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400}),
    # As published, less the MXFP4 quantization_config (a dequantized copy: the conversion
    # refuses the quantized experts).
    **{name: ("GptOssConfig", {
        "attention_bias": True, "head_dim": 64, "hidden_size": 2880, "intermediate_size": 2880,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2),
        "max_position_embeddings": 131072, "num_attention_heads": 64, "num_experts_per_tok": 4,
        "num_hidden_layers": layers, "num_key_value_heads": 8, "num_local_experts": experts,
        "rms_norm_eps": 1e-05, "rope_theta": 150000,
        "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                         "original_max_position_embeddings": 4096, "rope_type": "yarn",
                         "truncate": False},
        "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
        "tie_word_embeddings": False, "vocab_size": 201088})
       for name, layers, experts in (("gpt_oss_20b", 24, 32), ("gpt_oss_120b", 36, 128))},
    "glm4_5": ("Glm4MoeConfig", {
        "attention_bias": True, "first_k_dense_replace": 3, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 5120, "intermediate_size": 12288, "max_position_embeddings": 131072,
        "moe_intermediate_size": 1536, "n_group": 1, "n_routed_experts": 160,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 96,
        "num_experts_per_tok": 8, "num_hidden_layers": 92, "num_key_value_heads": 8,
        "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000, "routed_scaling_factor": 2.5, "tie_word_embeddings": False,
        "topk_group": 1, "use_qk_norm": True, "vocab_size": 151552}),
    "glm4_5_air": ("Glm4MoeConfig", {
        "attention_bias": True, "first_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 10944, "max_position_embeddings": 131072,
        "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 128,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 96,
        "num_experts_per_tok": 8, "num_hidden_layers": 46, "num_key_value_heads": 8,
        "num_nextn_predict_layers": 1, "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05,
        "rope_theta": 1000000, "routed_scaling_factor": 1.0, "tie_word_embeddings": False,
        "topk_group": 1, "use_qk_norm": False, "vocab_size": 151552}),
    "bloom_560m": ("BloomConfig", {
        "apply_residual_connection_post_layernorm": False, "hidden_size": 1024,
        "layer_norm_epsilon": 1e-05, "n_head": 16, "n_layer": 24, "vocab_size": 250880}),
    "falcon_7b": ("FalconConfig", {
        "alibi": False, "bias": False, "hidden_size": 4544, "layer_norm_epsilon": 1e-05,
        "multi_query": True, "new_decoder_architecture": False, "num_attention_heads": 71,
        "num_hidden_layers": 32, "parallel_attn": True, "vocab_size": 65024}),
    "falcon_40b": ("FalconConfig", {
        "alibi": False, "bias": False, "hidden_size": 8192, "layer_norm_epsilon": 1e-05,
        "new_decoder_architecture": True, "num_attention_heads": 128, "num_hidden_layers": 60,
        "num_kv_heads": 8, "parallel_attn": True, "vocab_size": 65024}),
    "gpt2": ("GPT2Config", {
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05, "n_embd": 768,
        "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257}),
}


@pytest.mark.parametrize("name", sorted(HUB_CONFIGS))
def test_zoo_entry_agrees_with_the_published_hugging_face_config(name):
    import transformers

    class_name, fields = HUB_CONFIGS[name]
    hf_config = getattr(transformers, class_name)(**fields)
    family = families.for_hf_config(hf_config)
    assert differences(_model(name), ModelConfig(name=name, **family.model_fields(hf_config))) == []


def test_a_run_that_tuned_the_experts_balancing_still_matches_its_hugging_face_model():
    m = _model("deepseek_v3")
    tuned = dataclasses.replace(m, moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                                moe_router_bias_update_rate=0.0)
    assert differences(tuned, m) == []
    assert differences(dataclasses.replace(m, moe_router_topk=4), m) == [
        "moe_router_topk: 4 (model=deepseek_v3) vs 8"]


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2_lite", "gpt_oss_20b",
                                  "gpt_oss_120b", "glm4_5", "glm4_5_air"])
def test_transformers_builds_the_counted_model_from_its_published_config(name):
    """transformers' own model of the published config.json (no weights: on the meta device)
    has exactly the parameters counted: DeepSeek's dense first layers, MoE ones and latents,
    gpt-oss's sinks and biases."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    class_name, fields = HUB_CONFIGS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(getattr(transformers, class_name)(**fields))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def gpu_plan(*overrides: str):
    """(cfg, layout, the plan `dry_run=true` prints) of a bf16 pretraining run at sequence 4096,
    micro-batch 1, the distributed optimizer, on nodes of eight Hopper GPUs."""
    cfg = compose_config(*overrides, "device=cuda", "precision=bf16", "data=mock",
                         "data.seq_length=4096", "stage.micro_batch_size=1",
                         "parallel.use_distributed_optimizer=true")
    layout = validate(cfg, Machine(gpus=8, has_transformer_engine=True, gpu_capability=(9, 0)))
    return cfg, layout, describe(cfg, layout)


def test_qwen3_32b_plans_for_one_node_of_eight_gpus():
    """The largest Qwen3 at TP 8 with the distributed optimizer: the plan `dry_run=true` prints
    fits an 80 GB GPU."""
    cfg, layout, plan = gpu_plan("model=qwen3_32b", "parallel=tp8pp1",
                                 "stage.global_batch_size=64")
    # 32.762 B as published, plus 640 rows each for the embedding and the output layer that pad
    # the vocabulary to a multiple of 128 x TP 8.
    assert "qwen3_32b: 32.769 B parameters (64 layers, hidden 5120, vocab 151936 padded to " \
           "152576)" in plan
    assert "TP 8  PP 1  CP 1  EP 1  DP 1" in plan
    assert memory_plan(cfg, layout).total < 80
    # Its attention is 8192 wide against a hidden size of 5120: the activations it keeps are
    # counted at that width. Against the same model with attention as wide as its hidden size,
    # 64 layers keep 13,824 more bytes a token (Q, K, V and attention output, split over TP 8)
    # for 4096 tokens: 0.42 GiB.
    narrow = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kv_channels=80))
    extra = memory_plan(cfg, layout).activations - memory_plan(narrow, layout).activations
    assert extra == pytest.approx(13_824 / 8 * 4096 * 64 / 2**30)


def test_qwen3_235b_a22b_plans_for_sixteen_nodes_with_its_experts_split_sixteen_ways():
    """The plan `dry_run=true` prints for the largest Qwen3-MoE: TP 4 x PP 2 x EP 16 on 128 GPUs
    fits an 80 GB GPU. Each rank holds a 16th of its stage's 47 x 128 experts (split over TP
    4), and their optimizer state whole: a rank's experts have no other copy to shard it with
    (DP 16 / EP 16)."""
    cfg, layout, plan = gpu_plan("model=qwen3_235b_a22b", "parallel.tensor_model_parallel_size=4",
                                 "parallel.pipeline_model_parallel_size=2",
                                 "parallel.expert_model_parallel_size=16", "launcher.nnodes=16",
                                 "stage.global_batch_size=1024")
    # 235.094 B as published, plus 128 padding rows each for the embedding and the output layer.
    assert "qwen3_235b_a22b: 235.095 B parameters (94 layers, hidden 4096, vocab 151936 padded " \
           "to 152064)" in plan
    assert "128 = 16 node(s) x 8  |  TP 4  PP 2  CP 1  EP 16  DP 16" in plan
    memory = memory_plan(cfg, layout)
    layer, experts = 2_487_755_008, 128 * 3 * 4096 * 1536
    last_stage = (47 * layer + 4096 + 152_064 * 4096) // 4  # layers, final norm, output layer
    own_experts = 47 * experts // 4 // 16
    assert memory.params_per_rank == last_stage - 47 * experts // 4 + own_experts
    # Adam's 12 bytes a parameter under bf16: the dense part sharded 16 ways, the experts not.
    dense = memory.params_per_rank - own_experts
    assert memory.optimizer == pytest.approx((dense * 12 / 16 + own_experts * 12) / 2**30)
    assert memory.total < 80


def test_deepseek_v3_plans_for_128_nodes_of_h200s_with_its_experts_split_64_ways():
    """The plan `dry_run=true` prints for DeepSeek-V3 as its paper trained it (PP 16, EP 64, no
    TP) on 1024 GPUs: its 61 layers as 1 (a dense one, beside the embedding) + 15 x 4, the last
    stage the heaviest (4 MoE layers and the output layer); it fits a 141 GB H200, not an 80 GB
    GPU (activations without recomputation: 16 micro-batches in flight)."""
    cfg, layout, plan = gpu_plan("model=deepseek_v3", "parallel.pipeline_model_parallel_size=16",
                                 "parallel.num_layers_in_first_pipeline_stage=1",
                                 "parallel.num_layers_in_last_pipeline_stage=4",
                                 "parallel.expert_model_parallel_size=64", "launcher.nnodes=128",
                                 "stage.global_batch_size=4096")
    assert "deepseek_v3: 671.026 B parameters (61 layers: 1 + " + "4 + " * 14 + "4 over the " \
           "pipeline stages, hidden 7168, vocab 129280 padded to 129280)" in plan
    assert "1024 = 128 node(s) x 8  |  TP 1  PP 16  CP 1  EP 64  DP 64" in plan
    memory = memory_plan(cfg, layout)
    # A MoE layer: attention (query latent, key/value latent, their norms, output), 256 routed
    # experts with their router rows, the shared expert, two norms.
    attention = ((7168 + 1 + 128 * 192) * 1536 + 7168 * (512 + 64) + (1 + 128 * 256) * 512
                 + 128 * 128 * 7168)
    expert = 3 * 7168 * 2048
    moe_layer = attention + 256 * (expert + 7168) + expert + 2 * 7168
    last_stage = 4 * moe_layer + 7168 + 129_280 * 7168
    own_experts = 4 * 256 * expert // 64
    assert memory.params_per_rank == last_stage - 4 * 256 * expert + own_experts
    dense = memory.params_per_rank - own_experts
    assert memory.optimizer == pytest.approx((dense * 12 / 64 + own_experts * 12) / 2**30)
    assert 80 < memory.total < 141e9 / 2**30


@pytest.mark.parametrize("name, split, processes", [
    ("glm4_5", ("parallel.tensor_model_parallel_size=4", "parallel.expert_model_parallel_size=8",
                "launcher.nnodes=16"), "128 = 16 node(s) x 8  |  TP 4  PP 4  CP 1  EP 8  DP 8"),
    ("gpt_oss_120b", ("parallel.expert_model_parallel_size=8", "launcher.nnodes=8"),
     "64 = 8 node(s) x 8  |  TP 1  PP 4  CP 1  EP 8  DP 16")])
def test_the_largest_glm_4_5_and_gpt_oss_plan_to_fit_80_gb_gpus(name, split, processes):
    """GLM-4.5 (355B) and gpt-oss-120b over four pipeline stages with their experts split over
    eight ranks: the plan `dry_run=true` prints fits an 80 GB GPU."""
    cfg, layout, plan = gpu_plan(f"model={name}", "parallel.pipeline_model_parallel_size=4",
                                 *split, "stage.global_batch_size=1024")
    assert processes in plan
    assert f"{name}: {PUBLISHED[name] / 1e9:.3f} B parameters" in plan
    assert memory_plan(cfg, layout).total < 80


@pytest.mark.parametrize("name", ["gpt2", "llama3_2_1b", "mistral_7b", "qwen2_5_0_5b",
                                  "qwen3_0_6b", "bloom_560m", "falcon_7b"])
def test_the_benchmarks_transformers_peer_builds_the_published_model(name):
    """`python -m llmtrain.bench`'s Hugging Face peer times the same model, of every family."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmtrain.bench.hf_peer import hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(dataclasses.asdict(_model(name))))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
