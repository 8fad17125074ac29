"""Conversion of every supported family, as a user runs it: Hugging Face -> Megatron-Core with the
layer-by-layer check, back to Hugging Face bitwise, and bad input refused with what to do.

The conversions call `llmtrain.convert.convert` (the command's own code, in this process: one
process per conversion costs the import of torch, Megatron and transformers each time); the
bad-input cases run the real command. Multi-process layouts are in test_convert_layouts.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_llmtrain, run_read_only
from hf_models import FAMILIES, assert_identical, tensors, tiny_hf
from llmtrain.convert import convert
from llmtrain.convert.run import CheckFailed

QUIET = dict(say=lambda *_: None)


def _check_passed_tightly(report: dict, num_layers: int = 4) -> None:
    check = report["check"]
    assert check["passed"] and check["dtype"] == "fp32"
    names = [row["name"] for row in check["rows"]]
    assert names == ["embedding", *(f"layer {i}" for i in range(num_layers)), "logits"]
    for row in check["rows"]:
        # fp32 on both sides, same weights: only summation order may differ.
        assert row["max_abs_diff"] <= 1e-5 * row["max_abs_reference"], row
        assert row["cosine"] > 0.999999, row
    assert check["top1_agreement"] == 1.0


@pytest.mark.parametrize("kind", FAMILIES)
def test_family_converts_verified_and_round_trips_bitwise(kind, tmp_path):
    hf = tiny_hf(kind, tmp_path / "hf", tokenizer=kind == "llama")
    mcore, back = tmp_path / "mcore", tmp_path / "back"

    report = convert(f"input={hf}", f"output={mcore}", **QUIET)
    _check_passed_tightly(report)
    assert report["family"] == kind.removesuffix("40b")
    # A Megatron-Core distributed checkpoint, training's layout, with the HF side files.
    assert (mcore / "latest_checkpointed_iteration.txt").read_text() == "0"
    assert (mcore / "iter_0000000" / "metadata.json").exists()
    assert json.loads((mcore / "config.json").read_text()) == json.loads(
        (hf / "config.json").read_text())
    saved = json.loads((mcore / "conversion_report.json").read_text())
    assert saved["check"]["passed"] and len(saved["check"]["rows"]) == 6

    report = convert("direction=mcore_to_hf", f"input={mcore}", f"output={back}", **QUIET)
    _check_passed_tightly(report)
    assert_identical(tensors(hf), tensors(back))
    assert (back / "config.json").read_text() == (hf / "config.json").read_text()


def test_prompts_are_tokenized_with_the_checkpoint_tokenizer(tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf", tokenizer=True)
    report = convert(f"input={hf}", "check_only=true", "prompts=[The capital of France is]",
                     **QUIET)
    from transformers import AutoTokenizer

    expected = AutoTokenizer.from_pretrained(str(hf))("The capital of France is")["input_ids"]
    assert report["check"]["sequences"] == [expected]
    assert report["check"]["tokens"] == f"the tokenizer in {hf.resolve()}"
    assert not (tmp_path / "mcore").exists() and report["output"] is None


def test_bf16_checkpoint_is_stored_in_bf16_and_checked_in_fp32(tmp_path):
    hf = tiny_hf("qwen2", tmp_path / "hf", dtype=torch.bfloat16)
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    report = convert(f"input={hf}", f"output={mcore}", **QUIET)
    assert report["dtype"] == "bf16"
    _check_passed_tightly(report)
    from llmtrain.megatron.checkpoint import stored_tensors

    stored = stored_tensors(mcore / "iter_0000000")
    assert {dtype for _, dtype in stored.values()} == {torch.bfloat16}, stored
    # The report weighs the conversion's peak memory against the model in bf16.
    memory = json.loads((mcore / "conversion_report.json").read_text())["memory"]
    weights = sum(t.numel() for t in tensors(hf).values())  # qwen2's tied output counted once
    assert memory["model_bytes"] == 2 * weights
    assert len(memory["processes_peak_rss_bytes"]) == 1
    assert min(memory["processes_peak_rss_bytes"]) > memory["model_bytes"]
    convert("direction=mcore_to_hf", f"input={mcore}", f"output={back}", "check=false", **QUIET)
    assert_identical(tensors(hf), tensors(back))


def test_output_in_another_format_and_sharded(tmp_path):
    hf = tiny_hf("gpt2", tmp_path / "hf")
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    report = convert(f"input={hf}", f"output={mcore}", "dtype=bf16", **QUIET)
    # Rounded to bf16 on the way: judged with bf16's tolerance (computed in fp32).
    assert report["check"]["tolerance"]["dtype"] == "bf16" and report["check"]["passed"]
    assert report["check"]["dtype"] == "fp32"
    # 0.1 MB files: the index lists every tensor, transformers loads it.
    report = convert("direction=mcore_to_hf", f"input={mcore}", f"output={back}",
                     "max_shard_size_gb=0.0001", **QUIET)
    assert report["check"]["passed"]
    index = json.loads((back / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 3 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    original = tensors(hf)
    written = tensors(back)
    assert sorted(written) == sorted(index["weight_map"]) == sorted(
        n for n in original if not n.endswith(".attn.bias"))
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, original[name].to(torch.bfloat16)), name
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"


def test_check_fails_beyond_the_tolerance(tmp_path):
    """bf16 rounds at other points in the two implementations: with fp32's tolerance the check
    must fail, and say so."""
    hf = tiny_hf("llama", tmp_path / "hf")
    with pytest.raises(CheckFailed, match="beyond the tolerances"):
        convert(f"input={hf}", "check_only=true", "check_dtype=bf16", "max_rel_diff=1e-6",
                **QUIET)


# Bad input, through the real command: exit code 2 and a message that says what to do.

def _refused(*args: str) -> str:
    process = run_llmtrain(*args, module="llmtrain.convert", check=False)
    assert process.returncode == 2, process.stdout + process.stderr
    return process.stderr


def test_missing_files_are_listed_by_name(tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(hf)).save_pretrained(str(hf), max_shard_size="200KB")
    (hf / "model.safetensors").unlink(missing_ok=True)
    shards = sorted(hf.glob("model-*.safetensors"))
    shards[1].unlink()
    (hf / "config.json").unlink()
    error = _refused(f"input={hf}", f"output={tmp_path / 'out'}")
    assert f"lacks: config.json, {shards[1].name}" in error
    assert "direction=mcore_to_hf" not in error
    assert not (tmp_path / "out").exists()

    # A training run's checkpoints given as a Hugging Face folder: the direction is named.
    (tmp_path / "run" / "iter_0000002").mkdir(parents=True)
    error = _refused(f"input={tmp_path / 'run'}", f"output={tmp_path / 'out'}")
    assert ("lacks: config.json, model.safetensors (or model.safetensors.index.json with its "
            "shards, or pytorch_model.bin); it holds a Megatron checkpoint: add "
            "direction=mcore_to_hf to convert it to Hugging Face") in error


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                             ffn_dim=32, num_attention_heads=2)).save_pretrained(tmp_path / "opt")
    error = _refused(f"input={tmp_path / 'opt'}", f"output={tmp_path / 'out'}")
    assert "architecture OPTForCausalLM (model_type opt) is not supported" in error
    for supported in ("LlamaForCausalLM (llama)", "Qwen2ForCausalLM (qwen2)",
                      "MistralForCausalLM (mistral)", "GPT2LMHeadModel (gpt2)",
                      "BloomForCausalLM (bloom)", "FalconForCausalLM (falcon)",
                      "Qwen3ForCausalLM (qwen3)"):
        assert supported in error


def test_tensor_parallel_size_that_does_not_divide_the_heads_fails_before_reading(tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf")
    # Weights that cannot be read: the layout must be refused before anything touches them.
    (hf / "model.safetensors").write_bytes(b"not a safetensors file")
    error = _refused(f"input={hf}", f"output={tmp_path / 'out'}", "tensor_model_parallel_size=3")
    assert ("model hf has 4 attention heads, which tensor parallel size 3 does not divide: "
            "choose a TP that divides it") in error


def test_model_that_disagrees_with_the_config_names_each_field(tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf")
    error = _refused(f"input={hf}", f"output={tmp_path / 'out'}", "model=llama3_2_1b")
    assert f"model=llama3_2_1b disagrees with {hf}/config.json on 11 field(s):" in error
    fields = [line.strip() for line in error.splitlines() if line.startswith("    ")]
    assert fields == [f"{name}: {ours} (model=llama3_2_1b) vs {theirs}" for name, ours, theirs in (
        ("num_layers", 16, 4), ("hidden_size", 2048, 64), ("ffn_hidden_size", 8192, 160),
        ("num_attention_heads", 32, 4), ("num_query_groups", 8, 2), ("kv_channels", 64, 16),
        ("vocab_size", 128256, 256), ("max_position_embeddings", 131072, 128),
        ("layernorm_epsilon", 1e-05, 1e-06), ("rope_scaling_factor", 32.0, 8.0),
        ("share_embeddings_and_output_weights", True, False))]


def test_output_that_holds_files_is_not_overwritten(tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    error = _refused(f"input={hf}", f"output={tmp_path / 'out'}")
    assert "exists and is not empty: choose a new folder" in error
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_read_only_output_is_refused_before_any_weight_is_read(tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf")
    # Weights that cannot be read: the output must be refused before anything touches them.
    (hf / "model.safetensors").write_bytes(b"not a safetensors file")
    folder = tmp_path / "ro"
    folder.mkdir()
    for output, probed in ((folder, folder), (folder / "new" / "mcore", folder)):
        done = run_read_only(folder, "llmtrain.convert", f"input={hf}", f"output={output}")
        assert done.returncode == 2, done.stdout + done.stderr
        assert (f"output={output}: cannot write to {probed} (" in done.stderr
                and "choose a folder you can write to" in done.stderr), done.stderr
        assert "Traceback" not in done.stderr
    assert list(folder.iterdir()) == []
    (tmp_path / "file").write_text("")
    error = _refused(f"input={hf}", f"output={tmp_path / 'file' / 'mcore'}")
    assert f"cannot write to {tmp_path / 'file'} (" in error


def test_truncated_weight_file_is_named(tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(hf)).save_pretrained(str(hf), max_shard_size="200KB")
    (hf / "model.safetensors").unlink(missing_ok=True)
    shard = sorted(hf.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])  # a download that stopped half way
    error = _refused(f"input={hf}", f"output={tmp_path / 'out'}")
    assert f"{shard} cannot be read, it is damaged or truncated ({len(data) // 2} bytes;" in error
    assert "download or copy it again" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists()


def test_config_that_does_not_match_the_weights_names_the_tensors(tmp_path):
    hf = tiny_hf("llama", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    error = _refused(f"input={hf}", f"output={tmp_path / 'out'}")
    assert (f"12 tensor(s) of {hf} do not have the shape {hf}/config.json gives them:"
            in error), error
    assert ("model.layers.0.mlp.down_proj.weight in model.safetensors: [64, 160], config.json "
            "makes it [64, 128]") in error
    assert "use the config.json published with them" in error and "Traceback" not in error


def test_moe_config_that_does_not_describe_its_experts_is_refused(tmp_path):
    """Experts narrower than config.json says are found from the files' headers, under the
    names transformers stores them by (each expert's own, not the fused tensor it holds them
    in)."""
    from llmtrain.convert.mapping import ConversionError

    hf = tiny_hf("qwen3_moe", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 64}))
    wrong = r"48 tensor\(s\) of .* do not have the shape"  # 4 layers x 4 experts x 3
    with pytest.raises(ConversionError, match=wrong) as error:
        convert(f"input={hf}", "check_only=true", **QUIET)
    assert ("model.layers.0.mlp.experts.0.down_proj.weight in model.safetensors: [64, 96], "
            "config.json makes it [64, 64]") in str(error.value)


def test_moe_routing_normalised_the_wrong_way_fails_the_check(tmp_path, monkeypatch):
    """Qwen3-MoE renormalises its top-k weights (norm_topk_prob): Megatron's softmax over the
    k chosen logits. The softmax over all experts, not renormalised, gives 1e-2 relative
    differences: the check fails."""
    import llmtrain.convert.families.qwen_moe as qwen_moe

    hf = tiny_hf("qwen3_moe", tmp_path / "hf")
    fields = qwen_moe.moe_fields
    monkeypatch.setattr(qwen_moe, "moe_fields",
                        lambda *args: {**fields(*args), "moe_router_pre_softmax": True})
    with pytest.raises(CheckFailed, match="beyond the tolerances"):
        convert(f"input={hf}", "check_only=true", **QUIET)


def test_both_expert_layouts_have_the_same_whole_model_names():
    """Megatron's local experts (SequentialMLP, on CPU) and Transformer Engine's grouped ones
    (TEGroupedMLP, on GPU) name expert k of an EP rank differently; both get the whole model's
    name of that expert (here the rank's first is expert 4)."""
    from llmtrain.megatron.weights import expert_name

    whole = "decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight"
    assert expert_name("decoder.layers.3.mlp.experts.local_experts.1.linear_fc1.weight", 4) == whole
    assert expert_name("decoder.layers.3.mlp.experts.linear_fc1.weight1", 4) == whole
    assert (expert_name("decoder.layers.0.mlp.experts.linear_fc2.weight11", 0)
            == "decoder.layers.0.mlp.experts.local_experts.11.linear_fc2.weight")


def test_tied_checkpoint_that_stores_the_output_layer_too(tmp_path):
    """Some published tied checkpoints store lm_head.weight, equal to the embedding: transformers
    loads them, so does the conversion; one that differs is refused with the difference."""
    from safetensors.torch import load_file, save_file

    hf = tiny_hf("qwen2", tmp_path / "hf")  # tied
    stored = load_file(str(hf / "model.safetensors"))
    embedding = stored["model.embed_tokens.weight"]
    save_file({**stored, "lm_head.weight": embedding.clone()}, str(hf / "model.safetensors"),
              metadata={"format": "pt"})
    report = convert(f"input={hf}", "check_only=true", **QUIET)
    _check_passed_tightly(report)

    different = embedding.clone()
    different[3, 5] += 0.5
    save_file({**stored, "lm_head.weight": different}, str(hf / "model.safetensors"),
              metadata={"format": "pt"})
    error = _refused(f"input={hf}", f"output={tmp_path / 'out'}")
    assert (f"{hf} stores lm_head.weight, which differs from model.embed_tokens.weight by up "
            f"to 0.5, though its config.json ties them (tie_word_embeddings=true): set "
            f"tie_word_embeddings to false in config.json to keep both") in error, error


def _process_group(group: int) -> list[str]:
    """`ps -g GROUP`: the processes of a process group, with their state (Z: defunct)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            name, rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
            if int(rest.split()[2]) == group:
                found.append(f"{pid} {rest.split()[0]} {name.split('(', 1)[1]}")
    return found


def test_no_process_outlives_the_command(tmp_path):
    """Under a PID 1 that reaps no orphans (a container without an init), any child left
    running when the command ends stays behind as a defunct process."""
    hf = tiny_hf("llama", tmp_path / "hf")
    command = subprocess.Popen([sys.executable, "-m", "llmtrain.convert", f"input={hf}",
                                f"output={tmp_path / 'mcore'}"], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, start_new_session=True)
    assert command.wait() == 0
    assert _process_group(command.pid) == []


def test_linear_rope_scaling_converts_and_yarn_and_dynamic_are_refused(tmp_path):
    """Linear scaling is Megatron-Core's seq_len_interpolation_factor: the logits match. YaRN and
    dynamic NTK are refused, naming what Megatron-Core lacks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmtrain.convert.families import by_name
    from llmtrain.convert.mapping import ConversionError

    def llama(name: str, rope: dict):
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, rope_scaling=rope)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(str(tmp_path / name))
        return tmp_path / name

    hf = llama("linear", {"rope_type": "linear", "factor": 4.0})
    report = convert(f"input={hf}", "check_only=true", **QUIET)
    _check_passed_tightly(report, num_layers=2)
    model = report["model"]
    assert model["seq_len_interpolation_factor"] == 4.0 and not model["rope_scaling"]
    from llmtrain.config.schema import ModelConfig

    family = by_name("llama")  # the config written back says linear again
    written = family.hf_config(ModelConfig(**model))
    assert written.rope_parameters["rope_type"] == "linear"
    assert written.rope_parameters["factor"] == 4.0

    for kind, missing in (("yarn", "the gpt_oss and deepseek families convert it"),
                          ("dynamic", "no RoPE whose base grows with the sequence length")):
        hf = llama(kind, {"rope_type": kind, "factor": 4.0,
                          "original_max_position_embeddings": 32})
        with pytest.raises(ConversionError,
                           match=rf"RoPE scaling of type '{kind}': .*{re.escape(missing)}"):
            convert(f"input={hf}", "check_only=true", **QUIET)


def test_gpt2_in_the_hubs_layout_comes_back_in_it(tmp_path):
    """GPT-2 checkpoints on the Hub store names without `transformer.` and the attention masks
    (attn.bias, attn.masked_bias): the way back writes the names and tensors it came with."""
    from safetensors.torch import load_file, save_file

    hf = tiny_hf("gpt2", tmp_path / "hf")
    stored = {name.removeprefix("transformer."): tensor
              for name, tensor in load_file(str(hf / "model.safetensors")).items()}
    for i in range(4):
        stored[f"h.{i}.attn.bias"] = torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128)
        stored[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(stored, str(hf / "model.safetensors"), metadata={"format": "pt"})
    mcore, back = tmp_path / "mcore", tmp_path / "back"

    _check_passed_tightly(convert(f"input={hf}", f"output={mcore}", **QUIET))
    report = convert("direction=mcore_to_hf", f"input={mcore}", f"output={back}", **QUIET)
    _check_passed_tightly(report)
    assert_identical(tensors(hf), tensors(back))


def test_gpt_oss_published_in_mxfp4_converts_dequantized(tmp_path):
    """The published gpt-oss experts are MXFP4 (FP4 codes, a power of two per 32 of them):
    dequantized as they are read, they pass the check against transformers' own dequantized
    model; the way back writes the dequantized experts, with a config.json that no longer says
    they are quantized."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    hf, mxfp4 = tiny_hf("gpt_oss", tmp_path / "hf"), tmp_path / "mxfp4"
    shutil.copytree(hf, mxfp4)
    stored, draw = load_file(hf / "model.safetensors"), torch.Generator().manual_seed(0)
    for name in [n for n in stored if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, inputs, outputs = stored.pop(name).shape
        groups = (experts, outputs, inputs // 32)
        stored[f"{name}_blocks"] = torch.randint(0, 256, (*groups, 16), generator=draw,
                                                 dtype=torch.uint8)
        stored[f"{name}_scales"] = torch.randint(119, 125, groups, generator=draw,
                                                 dtype=torch.uint8)
    save_file(stored, mxfp4 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((hf / "config.json").read_text())
    (mxfp4 / "config.json").write_text(json.dumps({**config, "quantization_config": {
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                            "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]}}))

    convert(f"input={mxfp4}", f"output={tmp_path / 'mcore'}", **QUIET)  # its check passes
    report = convert("direction=mcore_to_hf", f"input={tmp_path / 'mcore'}",
                     f"output={tmp_path / 'back'}", **QUIET)
    _check_passed_tightly(report)
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())
    expected = AutoModelForCausalLM.from_pretrained(mxfp4, dtype=torch.float32).state_dict()
    back = tensors(tmp_path / "back")
    assert sorted(back) == sorted(expected)
    assert all(torch.equal(back[name], expected[name]) for name in back)
    assert not torch.equal(back["model.layers.0.mlp.experts.down_proj"],
                           tensors(hf)["model.layers.0.mlp.experts.down_proj"])


def test_gpt_oss_that_does_not_convert_is_refused_with_what_to_do(tmp_path):
    """Weights quantized otherwise than MXFP4, a sigmoid gain other than quick_gelu's, and the
    biased experts over tensor-parallel ranks (Megatron-Core has them on one) are each named
    before a weight is read."""
    from llmtrain.config.validate import ConfigError
    from llmtrain.convert.mapping import ConversionError

    hf = tiny_hf("gpt_oss", tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(
        {**config, "swiglu_alpha": 1.5, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ConversionError) as error:
        convert(f"input={hf}", "check_only=true", **QUIET)
    assert str(error.value) == (
        "this gpt-oss config uses what llmtrain cannot convert yet: weights quantized with fp8 "
        "(quantization_config; MXFP4 experts are dequantized on import): dequantize them first "
        "(transformers: from_pretrained, then save_pretrained), then convert that folder; "
        "swiglu_alpha=1.5 (Megatron-Core's quick_gelu has 1.702 built in)")
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="has experts with biases .* use "
                                          "tensor_model_parallel_size=1, not 2"):
        convert(f"input={hf}", "check_only=true", "tensor_model_parallel_size=2", **QUIET)
