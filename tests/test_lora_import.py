"""A Hugging Face PEFT LoRA adapter trained elsewhere (made here with the `peft` package) loads
onto its base: `peft.load` for training further, `peft_load` for generation, with PeftModel's
logits; what llmtrain cannot place is refused before launch."""

from __future__ import annotations

import json
import shutil
from functools import partial

import pytest
import torch

from conftest import compose_config, run_llmtrain, summary

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(hf, folder, targets=TARGETS, **extra):
    """A LoRA of r=4 made by peft on the Hugging Face model, B random (PEFT starts it at 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(hf), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, **extra))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return peft_adapter(tiny_llama[0], tmp_path_factory.mktemp("peft") / "adapter")


def prompt_logprobs(prompt, engine):
    from llmtrain.generate.sequence import Sampling, Sequence

    out = engine.generate([Sequence(prompt, 4, Sampling(temperature=0), (),
                                    prompt_logprobs=True)])[0]
    return {"prompt": out.prompt_logprobs[1:], "tokens": out.tokens}


def test_a_peft_adapter_generates_with_peft_models_logits(tiny_llama, adapter):
    """generate/serve's engine with peft_load= gives PeftModel's log-probabilities."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from test_decode_engine import with_engine

    hf, mcore = tiny_llama
    prompt = list(range(5, 21))
    got = with_engine(mcore, partial(prompt_logprobs, prompt), f"peft_load={adapter}")
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(hf)
        plain = torch.log_softmax(base(torch.tensor([prompt])).logits[0], -1)
        model = PeftModel.from_pretrained(base, adapter)
        logits = torch.log_softmax(model(torch.tensor([prompt])).logits[0], -1)
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    want = logits[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    unadapted = plain[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert (want - unadapted).abs().max() > 1e-2  # the adapter changes the model
    assert torch.allclose(torch.tensor(got["prompt"]), want, atol=1e-4)
    assert got["tokens"] == greedy[0, len(prompt):].tolist()


def test_a_peft_adapter_trains_further_and_exports_back_unchanged(tiny_llama, adapter, tmp_path):
    """stage=sft peft=lora peft.load=<folder>: rank, alpha and targets from its
    adapter_config.json; one step at lr 0 and checkpoint.save_hf give the same tensors back."""
    from safetensors.torch import load_file

    hf, mcore = tiny_llama
    run = tmp_path / "run"
    out = run_llmtrain(f"hydra.searchpath=[file://{mcore}]", "model=hf", f"checkpoint.load={mcore}",
                       "stage=sft", "data=sft", "data.split='100,0,0'", "stage.epochs=null",
                       "data.seq_length=64", "stage.micro_batch_size=2",
                       "stage.global_batch_size=2", "stage.train_iters=1", "optim.lr=0",
                       "optim.min_lr=0", "optim.lr_warmup_iters=0", "peft=lora",
                       f"peft.load={adapter}", "checkpoint.save_hf=true",
                       f"hydra.run.dir={run}").stdout
    assert f"LoRA: 16 adapters (r=4) from {adapter} on the frozen base" in out
    assert len(summary(run)["losses"]) == 1
    back = run / "checkpoints" / "hf_iter_0000001"
    original, exported = (load_file(str(f / "adapter_model.safetensors")) for f in (adapter, back))
    assert sorted(exported) == sorted(original) and len(original) == 4 * 7 * 2
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    config = json.loads((back / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (
        4, 8, sorted(TARGETS))


def test_what_llmtrain_cannot_place_is_refused_before_launch(tiny_llama, adapter, tmp_path):
    from llmtrain.config.layout import Machine
    from llmtrain.config.validate import ConfigError, validate

    hf, mcore = tiny_llama

    def problems(folder, *overrides):
        cfg = compose_config(f"hydra.searchpath=[file://{mcore}]", "model=hf", "stage=sft",
                             "data=sft", f"checkpoint.load={mcore}", "peft=lora",
                             f"peft.load={folder}", *overrides)
        with pytest.raises(ConfigError) as error:
            validate(cfg, Machine())
        return str(error.value)

    def edited(name, **changes):
        folder = tmp_path / name
        shutil.copytree(adapter, folder)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return folder

    cfg = compose_config("stage=sft", f"peft.load={adapter}")  # peft=none
    with pytest.raises(ConfigError, match="is a LoRA adapter: add peft=lora"):
        validate(cfg, Machine())
    text = problems(adapter, "peft.r=8", "peft.lora_alpha=8")
    assert f"peft.r=8 contradicts r=4 of the adapter (peft.load={adapter}" in text
    assert "drop peft.r, which peft.load gives" in text and "lora_alpha" not in text
    text = problems(edited("dora", use_dora=True, use_rslora=True, modules_to_save=["lm_head"]))
    assert "DoRA (use_dora=true) is not supported: merge it into the base" in text
    assert "rank-stabilised LoRA (use_rslora=true" in text
    assert "modules_to_save (whole trained copies of ['lm_head'])" in text
    assert "target_modules ['embed_tokens'] have no place" in problems(
        edited("embed", target_modules=[*TARGETS, "embed_tokens"]))
    assert "lacks adapter_config.json and adapter_model.safetensors" in problems(tmp_path)
    assert ("was trained for another base model: 12 tensor(s) of another shape, e.g. "
            "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight [4, 160] (model "
            "hf needs [4, 96])") in problems(adapter, "model.ffn_hidden_size=96")


def on_and_merged(prompt, plan, cfg, layout) -> dict:
    """Greedy generation with the adapters switched on (as GRPO/PPO rollouts run them), then
    with them merged into the base weights: (engine, tokens, log-probabilities) of each."""
    from llmtrain.generate.sequence import Sampling, Sequence
    from llmtrain.megatron import checkpoint, lora, lora_checkpoint, parallel
    from llmtrain.megatron.inference import make_engine
    from llmtrain.megatron.model import build_model

    parallel.initialize(layout, cfg.seed)
    try:
        chunks = build_model(cfg, layout)
        checkpoint.load(plan.root, plan.iteration, chunks, None, None, weights_only=True)
        lora.add_adapters(chunks, cfg.peft, 0)
        lora_checkpoint.load_peft(chunks, cfg.peft.load)
        chunks[0].eval()
        found = {}
        for name in ("on", "merged"):
            engine = make_engine(chunks[0], cfg.model.vocab_size, 2, 64, "cpu", 0)
            out = engine.generate([Sequence(prompt, 8, Sampling(temperature=0), (),
                                            logprobs=0)])[0]
            found[name] = (engine.description, out.tokens, out.logprobs)
            lora.merge(chunks)
        return found
    finally:
        parallel.shutdown()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], TARGETS])
def test_generation_with_the_adapters_on_is_generation_from_the_merged_model(tiny_llama,
                                                                           tmp_path, targets):
    """Rollouts generate with the adapters on: the decode engine adds each adapter to its
    layer's product as the model's forward does. They give what the merged model gives, and
    PeftModel. PEFT's Llama default, q_proj and v_proj alone (the fused qkv adapter's k part is
    zero), and every projection."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmtrain.generate.config import compose, register
    from llmtrain.generate.plan import prepare
    from llmtrain.launch.local import launch

    hf, mcore = tiny_llama
    qv = peft_adapter(hf, tmp_path / "qv", targets)
    plan = prepare(compose("generate", register, [f"load={mcore}", f"peft_load={qv}",
                                                  "input=unused", "output=unused"]))
    assert "linear_qkv" in plan.cfg.peft.target_modules
    prompt = list(range(5, 21))
    found = launch(plan.cfg, plan.layout, entry=partial(on_and_merged, prompt, plan))
    assert found["on"][0].startswith("decode engine")
    assert found["merged"][0].startswith("decode engine")
    assert found["on"][1] == found["merged"][1]
    assert torch.allclose(torch.tensor(found["on"][2]), torch.tensor(found["merged"][2]),
                          atol=1e-4)
    with torch.no_grad():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf), qv)
        tokens = torch.tensor([prompt + found["on"][1]])
        logp = torch.log_softmax(model(tokens).logits[0, len(prompt) - 1:-1], -1)
    want = logp.gather(1, tokens[0, len(prompt):, None])[:, 0]
    assert logp.argmax(-1).tolist() == found["on"][1]  # PeftModel's greedy choices
    assert torch.allclose(torch.tensor(found["on"][2]), want, atol=1e-4)
