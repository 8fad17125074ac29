"""checkpoint.load=<Hugging Face folder>: one command from a Hugging Face model to a fine-tuned
Hugging Face model (llmtrain/hf_load.py), as a user types it, and the folders it refuses."""

from __future__ import annotations

import json

import pytest

from conftest import CHAT_TEMPLATE, compose_config, run_llmtrain
from hf_models import tiny_hf
from llmtrain import hf_load
from llmtrain.config.validate import ConfigError

SFT = ["stage=sft", "data=sft", "stage.epochs=null", "stage.train_iters=2", "data.seq_length=64",
       "stage.micro_batch_size=2", "stage.global_batch_size=4", "optim.lr=1e-3"]


def _hf(folder):
    hf = tiny_hf("llama", folder, tokenizer=True)
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}))
    return hf


def test_one_command_from_a_hugging_face_folder_to_a_hugging_face_folder(tmp_path):
    """No model=, no tokenizer, no conversion step: fine-tuned at TP 2 from the folder (checked
    against transformers on the way in), exported back; the same command again resumes from its
    own checkpoint and converts nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, cache, run = _hf(tmp_path / "hf"), tmp_path / "cache", tmp_path / "run"
    command = [f"checkpoint.load={hf}", *SFT, "parallel=tp2pp1",
               f"checkpoint.hf_import_dir={cache}", f"hydra.run.dir={run}"]
    out = run_llmtrain(*command, "checkpoint.save_hf=true").stdout
    assert (f"checkpoint.load is a Hugging Face folder: model=hf "
            f"data.tokenizer.tokenizer_type=huggingface data.tokenizer.tokenizer_model={hf} "
            f"checkpoint.finetune=true") in out
    assert "converting it (once)" in out and "on 2 process(es) (TP 2 x PP 1)" in out
    (imported,) = cache.glob("hf-*")
    # The model trained is transformers' own, layer by layer (the conversion's check, at TP 2).
    check = json.loads((imported / "conversion_report.json").read_text())["check"]
    assert check["passed"] and check["top1_agreement"] == 1.0
    assert all(row["max_abs_diff"] <= 1e-5 * row["max_abs_reference"] for row in check["rows"])
    assert f"loaded {imported}/iter_0000000 (weights only: a new schedule starts)" in out

    exported = run / "checkpoints" / "hf_iter_0000002"
    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.chat_template == CHAT_TEMPLATE and model.config.num_hidden_layers == 4

    # An import of the folder from before its files changed is removed; another layout's stays.
    stale, other_layout = cache / "hf-0000000000000000", cache / "hf-1111111111111111"
    for entry, tp in ((stale, 2), (other_layout, 1)):
        entry.mkdir()
        (entry / hf_load.SOURCE).write_text(json.dumps({
            "folder": str(hf.resolve()), "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": 1}) + "\n")
    again = run_llmtrain(*command).stdout
    assert "converting" not in again and f"converted and checked before, loading {imported}" \
        in again
    assert f"loaded {run}/checkpoints/iter_0000002; resuming after step 2" in again
    assert f"removing {stale}: an import of the same folder at the same layout" in again
    assert not stale.exists() and other_layout.exists() and imported.exists()


def test_bad_hugging_face_folders_are_refused_before_launch(tmp_path):
    """An architecture that does not convert, weights missing, a model= that is not the
    folder's: each named, with what to do, before anything starts."""
    from transformers import OPTConfig

    opt = tmp_path / "opt"
    OPTConfig(architectures=["OPTForCausalLM"]).save_pretrained(opt)
    (opt / "model.safetensors").touch()
    refused = run_llmtrain(f"checkpoint.load={opt}", f"hydra.run.dir={tmp_path / 'run'}",
                           check=False)
    assert refused.returncode == 2
    assert ("architecture OPTForCausalLM (model_type opt) is not supported; supported "
            "architectures: LlamaForCausalLM (llama)") in refused.stderr
    assert not (tmp_path / "run").exists()

    hf = _hf(tmp_path / "hf")
    (hf / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(ConfigError, match="the Hugging Face model folder lacks: model.safetensors"):
        hf_load.overrides([f"checkpoint.load={hf}"])
    (tmp_path / "weights.safetensors").rename(hf / "model.safetensors")

    with pytest.raises(ConfigError) as error:
        hf_load.check_model(compose_config("model=tiny", f"checkpoint.load={hf}"))
    assert f"model=tiny disagrees with {hf}/config.json on 10 field(s):" in str(error.value)
    assert "hidden_size: 256 (model=tiny) vs 64" in str(error.value)
    assert "leave model= out to take the model from" in str(error.value)


def test_a_hugging_face_folder_named_in_an_experiment_gives_the_model_and_tokenizer(tmp_path):
    """experiment=ft whose YAML loads the folder, and chooses neither a model nor a tokenizer:
    the folder gives both, as on the command line; what the experiment sets stays its own."""
    hf = _hf(tmp_path / "hf")
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "ft.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /stage: sft\n"
        f"checkpoint:\n  load: {hf}\n  finetune: false\n"
        "data:\n  tokenizer:\n    tokenizer_type: huggingface\n")
    args = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=ft"]
    full, added = hf_load.overrides(args)
    assert added == ["model=hf", f"data.tokenizer.tokenizer_model={hf}"]
    cfg = compose_config(*full)
    assert cfg.model.hidden_size == 64 and cfg.data.tokenizer.tokenizer_model == str(hf)
    assert cfg.checkpoint.finetune is False and cfg.stage.name == "sft"
    hf_load.check_model(cfg)
