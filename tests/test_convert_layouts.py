"""Conversions on several processes, run as a user runs them (`python -m llmtrain.convert`):
TP=2 x PP=2 and back (Qwen3), experts over EP=2 and back at TP=2 (Qwen2-MoE), tensor-parallel
multi-latent attention (DeepSeek-V3), ALiBi and parallel attention, a Megatron-LM checkpoint split over TP ranks, and training started
from a converted checkpoint under another layout."""

from __future__ import annotations

import argparse
import io
import json
import sys
import types

import torch

from conftest import FAST, run_llmtrain, summary
from hf_models import assert_identical, tensors, tiny_hf

SHORT = [arg for arg in FAST if not arg.startswith("optim.")]


def _convert(*args: str) -> str:
    return run_llmtrain(*args, module="llmtrain.convert").stdout


def _report(folder) -> dict:
    return json.loads((folder / "conversion_report.json").read_text())


def _tight(check: dict) -> None:
    assert check["passed"] and check["top1_agreement"] == 1.0
    for row in check["rows"]:
        assert row["max_abs_diff"] <= 1e-5 * row["max_abs_reference"], row


def test_tp2_pp2_and_back_under_another_layout(tmp_path):
    """Tied embeddings on both pipeline stages, GQA with a head size of its own (Qwen3's), the
    Q/K norms on every TP rank and the gated MLP split over TP ranks."""
    hf = tiny_hf("qwen3", tmp_path / "hf")
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    out = _convert(f"input={hf}", f"output={mcore}", "tensor_model_parallel_size=2",
                   "pipeline_model_parallel_size=2")
    assert "on 4 process(es) (TP 2 x PP 2)" in out
    report = _report(mcore)
    assert report["layout"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2,
                                "expert_model_parallel_size": 1}
    _tight(report["check"])
    _convert("direction=mcore_to_hf", f"input={mcore}", f"output={back}",
             "pipeline_model_parallel_size=2")
    _tight(_report(back)["check"])
    assert_identical(tensors(hf), tensors(back))


def test_experts_split_over_expert_parallel_ranks_and_back_under_tensor_parallelism(tmp_path):
    """Qwen2-MoE (routed experts, a gated shared expert, a dense layer among them): written with
    its experts split over two EP ranks, read back under TP 2 (each expert split over two TP
    ranks), bitwise."""
    hf = tiny_hf("qwen2_moe", tmp_path / "hf")
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    out = _convert(f"input={hf}", f"output={mcore}", "expert_model_parallel_size=2")
    assert "on 2 process(es) (TP 1 x PP 1 x EP 2)" in out
    assert _report(mcore)["layout"]["expert_model_parallel_size"] == 2
    _tight(_report(mcore)["check"])
    # The MoE layers' pre-MLP norm under its own name, the one Transformer Engine's MoE layers
    # load on a GPU (they keep it apart from the experts); the dense layer 2's under the fused
    # fc1 name of Transformer Engine's dense layer.
    from torch.distributed.checkpoint import FileSystemReader

    names = FileSystemReader(str(mcore / "iter_0000000")).read_metadata().state_dict_metadata
    assert sorted(n for n in names if n.endswith(("pre_mlp_layernorm.weight",
                                                  "fc1.layer_norm_weight"))) == [
        "decoder.layers.0.pre_mlp_layernorm.weight", "decoder.layers.1.pre_mlp_layernorm.weight",
        "decoder.layers.2.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.3.pre_mlp_layernorm.weight"]
    _convert("direction=mcore_to_hf", f"input={mcore}", f"output={back}",
             "tensor_model_parallel_size=2")
    _tight(_report(back)["check"])
    assert_identical(tensors(hf), tensors(back))


def test_multi_latent_attention_and_expert_bias_under_tensor_parallelism(tmp_path):
    """DeepSeek-V3 at TP 2: the latents' down projections split over the ranks and gathered
    before their norms, the heads' up projections split, the router's expert bias on both."""
    hf = tiny_hf("deepseek_v3", tmp_path / "hf")
    out = _convert(f"input={hf}", "check_only=true", "tensor_model_parallel_size=2")
    assert "on 2 process(es) (TP 2 x PP 1)" in out
    assert "check passed" in out


def test_alibi_and_parallel_attention_under_tensor_parallelism(tmp_path):
    """Each TP rank's ALiBi slopes are its own heads'; Falcon's parallel layer splits too."""
    for kind in ("bloom", "falcon40b"):
        hf = tiny_hf(kind, tmp_path / kind)
        out = _convert(f"input={hf}", "check_only=true", "tensor_model_parallel_size=2")
        assert "on 2 process(es) (TP 2 x PP 1)" in out
        assert "check passed" in out


def _write_megatron_lm(hf, root, tp: int) -> None:
    """A Megatron-LM torch checkpoint of a Hugging Face Llama, written out by hand as Megatron-LM
    lays it out: Transformer Engine names (norms fused into the next linear layer), Q/K/V
    interleaved per KV group, [gate; up] per TP rank, `_extra_state` entries, and training
    arguments that name a class this machine does not have."""
    weights = tensors(hf)
    config = json.loads((hf / "config.json").read_text())
    layers, hidden, heads = (config["num_hidden_layers"], config["hidden_size"],
                             config["num_attention_heads"])
    groups, size = config["num_key_value_heads"], hidden // heads

    def qkv(i):
        q, k, v = (weights[f"model.layers.{i}.self_attn.{p}_proj.weight"] for p in "qkv")
        return torch.cat([q.reshape(groups, heads // groups, size, hidden),
                          k.reshape(groups, 1, size, hidden),
                          v.reshape(groups, 1, size, hidden)], dim=1).reshape(-1, hidden)

    module = types.ModuleType("megatron.training.absent")
    backend = type("AttnBackend", (), {"__module__": module.__name__})
    module.AttnBackend = backend
    sys.modules[module.__name__] = module
    args = argparse.Namespace(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=config["intermediate_size"],
        num_attention_heads=heads, group_query_attention=True, num_query_groups=groups,
        kv_channels=size, padded_vocab_size=config["vocab_size"], make_vocab_size_divisible_by=128,
        max_position_embeddings=config["max_position_embeddings"], normalization="RMSNorm",
        norm_epsilon=config["rms_norm_eps"], swiglu=True, add_bias_linear=False,
        add_qkv_bias=False, position_embedding_type="rope", rotary_base=500000,
        use_rope_scaling=True, rope_scaling_factor=8.0, untie_embeddings_and_output_weights=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, bf16=False,
        attention_backend=backend())
    for rank in range(tp):
        state = {"embedding.word_embeddings.weight":
                 weights["model.embed_tokens.weight"].chunk(tp)[rank]}
        for i in range(layers):
            mine, hf_layer = f"decoder.layers.{i}.", f"model.layers.{i}."
            state[mine + "self_attention.linear_qkv.layer_norm_weight"] = weights[
                hf_layer + "input_layernorm.weight"]
            state[mine + "self_attention.linear_qkv.weight"] = qkv(i).chunk(tp)[rank]
            state[mine + "self_attention.linear_qkv._extra_state"] = io.BytesIO()
            state[mine + "self_attention.linear_proj.weight"] = weights[
                hf_layer + "self_attn.o_proj.weight"].chunk(tp, dim=1)[rank]
            state[mine + "mlp.linear_fc1.layer_norm_weight"] = weights[
                hf_layer + "post_attention_layernorm.weight"]
            state[mine + "mlp.linear_fc1.weight"] = torch.cat(
                [weights[hf_layer + "mlp.gate_proj.weight"].chunk(tp)[rank],
                 weights[hf_layer + "mlp.up_proj.weight"].chunk(tp)[rank]])
            state[mine + "mlp.linear_fc2.weight"] = weights[
                hf_layer + "mlp.down_proj.weight"].chunk(tp, dim=1)[rank]
        state["decoder.final_layernorm.weight"] = weights["model.norm.weight"]
        state["output_layer.weight"] = weights["lm_head.weight"].chunk(tp)[rank]
        folder = root / "iter_0000100" / f"mp_rank_{rank:02d}"
        folder.mkdir(parents=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 100, "model": state,
                    "optimizer": {}, "rng_state": []}, folder / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("100")
    del sys.modules[module.__name__]


def test_megatron_lm_checkpoint_imports_exactly(tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf")
    megatron_lm, mcore, back = tmp_path / "megatron_lm", tmp_path / "mcore", tmp_path / "back"
    _write_megatron_lm(hf, megatron_lm, tp=2)

    out = _convert("direction=megatron_to_mcore", f"input={megatron_lm}", f"output={mcore}")
    assert "on 2 process(es) (TP 2 x PP 1)" in out
    assert "read back: 54 tensors, 0 differing" in out  # 27 per TP rank
    # No config.json in a Megatron-LM checkpoint: the model config written beside it says
    # which model it is, for training and for the way back.
    model = mcore / "model" / "megatron_lm.yaml"
    assert "family: llama" in model.read_text()
    _convert("direction=mcore_to_hf", f"input={mcore}", f"output={back}",
             f"hydra.searchpath=[file://{mcore}]", "model=megatron_lm")
    _tight(_report(back)["check"])
    assert_identical(tensors(hf), tensors(back))


def test_training_starts_from_a_converted_checkpoint(tmp_path):
    """Converted at TP 1, fine-tuned in bf16 at TP 2 (weights only, a new schedule) with a
    learning rate of 0 so that the weights stay put, exported: the original tensors come back
    (bf16 keeps fp32 main weights in the optimizer: they must be the loaded ones)."""
    hf = tiny_hf("llama", tmp_path / "hf", dtype=torch.bfloat16, tokenizer=True)
    mcore, run, back = tmp_path / "mcore", tmp_path / "run", tmp_path / "back"
    out = _convert(f"input={hf}", f"output={mcore}", "check=false")
    assert f"model=hf checkpoint.load={mcore} checkpoint.finetune=true" in out

    train = run_llmtrain(
        f"hydra.searchpath=[file://{mcore}]", "model=hf", f"checkpoint.load={mcore}",
        "checkpoint.finetune=true", "parallel=tp2pp1", "precision=bf16", *SHORT,
        "stage.train_iters=2",
        "optim.lr=0", "optim.min_lr=0", "optim.lr_warmup_iters=0", "checkpoint.save=ckpt",
        f"hydra.run.dir={run}").stdout
    assert f"loaded {mcore}/iter_0000000 (weights only: a new schedule starts)" in train
    assert summary(run)["start_step"] == 0 and len(summary(run)["losses"]) == 2

    _convert("direction=mcore_to_hf", f"input={run / 'ckpt'}", f"output={back}",
             f"hydra.searchpath=[file://{mcore}]", "model=hf", f"tokenizer={hf}", "check=false")
    assert_identical(tensors(hf), tensors(back))
    assert (back / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()

    # Resuming it as a training checkpoint says what to add.
    resumed = run_llmtrain(f"hydra.searchpath=[file://{mcore}]", "model=hf",
                           f"checkpoint.load={mcore}", *FAST, "stage.train_iters=3",
                           f"hydra.run.dir={tmp_path / 'resume'}", check=False)
    assert resumed.returncode != 0
    assert "holds weights only (a converted model): add checkpoint.finetune=true" in (
        resumed.stdout + resumed.stderr)
