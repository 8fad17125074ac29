"""checkpoint.save_hf: a run writes Hugging Face folders beside its Megatron checkpoints, which
transformers loads and generates from."""

import shutil

import pytest
import torch

from conftest import FAST, compose_config, run_llmtrain
from llmtrain.config.layout import Machine
from llmtrain.config.validate import ConfigError, validate


def test_a_run_saves_hugging_face_folders_transformers_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmtrain.data.corpus import corpus_tokenizer_path

    tokenizer_folder = tmp_path / "tokenizer"  # a Hugging Face tokenizer: the export copies it
    tokenizer_folder.mkdir()
    shutil.copy(corpus_tokenizer_path(), tokenizer_folder / "tokenizer.json")
    (tokenizer_folder / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    run_dir = tmp_path / "run"
    out = run_llmtrain("model=tiny", *FAST, "data.tokenizer.tokenizer_type=huggingface",
                       f"data.tokenizer.tokenizer_model={tokenizer_folder}",
                       "stage.train_iters=4", "checkpoint.save_interval=2",
                       "checkpoint.save_hf=true", "checkpoint.save_hf_interval=2",
                       f"hydra.run.dir={run_dir}").stdout
    saved = run_dir / "checkpoints"
    # Step 2's export (a process of its own, seconds long) ran while steps 3 and 4 trained.
    lines = out.splitlines()
    exported = next(i for i, line in enumerate(lines) if "hf_iter_0000002" in line)
    assert any("step      3/4" in line for line in lines[:exported]), out
    assert sorted(p.name for p in saved.glob("*hf_iter_*")) == ["hf_iter_0000002",
                                                               "hf_iter_0000004"]
    folder = saved / "hf_iter_0000004"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("The Python language", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 5
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 256
    # Different steps, different weights: each folder is its own step's.
    earlier = AutoModelForCausalLM.from_pretrained(saved / "hf_iter_0000002")
    assert not torch.equal(earlier.model.layers[0].mlp.up_proj.weight,
                           model.model.layers[0].mlp.up_proj.weight)


def test_save_hf_settings_are_checked_before_anything_runs():
    cfg = compose_config("model=tiny", "checkpoint.save=null", "checkpoint.save_hf=true",
                         "checkpoint.save_interval=10", "checkpoint.save_hf_interval=15")
    with pytest.raises(ConfigError) as error:
        validate(cfg, Machine())
    assert "checkpoint.save_hf writes its Hugging Face folder beside the Megatron checkpoints: " \
           "set checkpoint.save too" in str(error.value)
    assert "checkpoint.save_hf_interval=15 must be a multiple of checkpoint.save_interval=10" \
        in str(error.value)
