"""DeepSeek-V3 and V2 as a user meets them beyond the per-family round trip (test_convert.py):
a Hub checkpoint with its multi-token-prediction layer, and a training step of a tiny model
with every DeepSeek-V3 feature (dense first layer, multi-latent attention with YaRN, sigmoid
group-limited routing with the expert bias, scaled weights, a shared expert)."""

from __future__ import annotations

import math

import torch

from conftest import run_llmtrain, summary
from hf_models import tiny_hf
from llmtrain.config.plan import count_parameters
from llmtrain.config.schema import ModelConfig
from llmtrain.convert import convert


def test_multi_token_prediction_layer_is_skipped_with_a_note(tmp_path):
    """V3's Hub checkpoints hold layer num_hidden_layers for multi-token prediction: its tensors
    are left out, the console says so, and the rest converts and checks as without it."""
    from safetensors.torch import load_file, save_file

    hf = tiny_hf("deepseek_v3", tmp_path / "hf")
    weights = load_file(str(hf / "model.safetensors"))
    counted = sum(t.numel() for name, t in weights.items()
                  if not name.endswith("e_score_correction_bias"))  # a buffer, not a parameter
    mtp = {f"model.layers.4.{name}": torch.randn(64, 64)
           for name in ("eh_proj.weight", "self_attn.o_proj.weight")}
    save_file({**weights, **mtp, "model.layers.4.enorm.weight": torch.ones(64)},
              str(hf / "model.safetensors"), metadata={"format": "pt"})
    said = []
    report = convert(f"input={hf}", "check_only=true", say=said.append)
    assert ("[convert] note: skipped 3 tensor(s) of layer(s) 4 (multi-token prediction, past "
            "the 4 layers): llmtrain does not train multi-token prediction, and the converted "
            "model goes without it") in said
    assert report["check"]["passed"] and report["check"]["top1_agreement"] == 1.0
    model = ModelConfig(**report["model"])
    assert model.moe_layer_freq == [0, 1, 1, 1]
    assert count_parameters(model, model.vocab_size).total == counted


def test_a_training_step_of_a_tiny_deepseek_v3(tmp_path):
    args = ["model=tiny_moe", "model.num_query_groups=null", "model.multi_latent_attention=true",
            "model.qk_layernorm=true", "model.q_lora_rank=64", "model.kv_lora_rank=32",
            "model.qk_head_dim=32", "model.qk_pos_emb_head_dim=16", "model.v_head_dim=32",
            "model.rope_type=yarn", "model.rotary_scaling_factor=4",
            "model.original_max_position_embeddings=32", "model.mscale_all_dim=1.0",
            "model.moe_layer_freq=[0,1,1,1]", "model.moe_ffn_hidden_size=64",
            "model.moe_shared_expert_intermediate_size=64",
            "model.moe_router_score_function=sigmoid", "model.moe_router_enable_expert_bias=true",
            "model.moe_router_num_groups=2", "model.moe_router_group_topk=1",
            "model.moe_router_topk_scaling_factor=2.5", "data=mock", "data.seq_length=32",
            "stage.micro_batch_size=2", "stage.global_batch_size=2", "stage.train_iters=1",
            "stage.eval_interval=0", "optim.lr_warmup_iters=0", "checkpoint.save=null"]
    out = run_llmtrain(*args, f"hydra.run.dir={tmp_path}").stdout
    # The dense first layer routes nothing: the expert load is the MoE layers'.
    assert "step      1 | expert load imbalance (busiest / mean) of layers 1-3: " in out
    losses = summary(tmp_path)["losses"]
    assert len(losses) == 1 and math.isfinite(losses[0])


def test_layer_pattern_and_latent_attention_settings_that_cannot_run_are_refused():
    """Before launch, each with what to do."""
    import pytest

    from conftest import compose_config
    from llmtrain.config.layout import Machine
    from llmtrain.config.validate import ConfigError, validate

    cfg = compose_config("model=tiny_moe", "model.moe_layer_freq=[0,1]",
                         "model.multi_latent_attention=true")
    with pytest.raises(ConfigError) as error:
        validate(cfg, Machine())
    assert error.value.problems == [
        "model.moe_layer_freq has 2 entries [0, 1]: give one 0 (dense) or 1 (MoE) for each of the "
        "4 layers, e.g. [0, 1, 1, ...] for a dense first layer",
        "model.multi_latent_attention=true gives every head its own key and value (from the "
        "shared latent): set model.num_query_groups=null, not 4"]
    validate(compose_config("model=tiny_moe", "model.moe_layer_freq=2"), Machine())
