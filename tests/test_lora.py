"""peft=lora: adapters on a frozen base, trained for SFT, saved alone, resumed exactly under
another layout, refused on another base."""

from __future__ import annotations

import json

import pytest

from conftest import compose_config, run_llmtrain, summary

SMALL = ["model.num_layers=2", "data.seq_length=64", "stage.micro_batch_size=2",
         "stage.global_batch_size=4", "optim.lr_warmup_iters=0"]
SFT = [*SMALL, "stage=sft", "data=sft", "data.split='100,0,0'", "stage.epochs=null",
       "stage.train_iters=6", "optim.lr=5e-3", "optim.min_lr=5e-3", "peft=lora", "peft.r=4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A two-step pretrained tiny model: the frozen base of the LoRA runs."""
    run_dir = tmp_path_factory.mktemp("base")
    run_llmtrain(*SMALL, "stage.train_iters=2", "optim.lr=1e-3", f"hydra.run.dir={run_dir}")
    return run_dir / "checkpoints"


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lora")
    out = run_llmtrain(*SFT, f"checkpoint.load={base}", f"hydra.run.dir={run_dir}").stdout
    return run_dir, out


def test_lora_sft_learns_and_saves_the_adapters_alone(uninterrupted):
    from llmtrain.megatron.checkpoint import stored_tensors

    run_dir, out = uninterrupted
    assert "LoRA: 8 adapters (r=4) on the frozen base" in out
    losses = summary(run_dir)["losses"]
    assert losses[-1] < losses[0] - 0.3
    stored = stored_tensors(run_dir / "checkpoints" / "iter_0000006")
    model = {k: v[0] for k, v in stored.items() if not k.startswith("optimizer.")}
    # Layers stacked (2 of them); fused QKV: one (A, B) pair per q, k, v, B of q with the
    # query rows (8 heads x 32), of k and v the 4 groups' rows; gated fc1: per gate, up.
    attention, mlp = "decoder.layers.self_attention.", "decoder.layers.mlp."
    assert model[attention + "linear_qkv_lora.A_k"] == [2, 4, 256]
    assert model[attention + "linear_qkv_lora.B_q"] == [2, 256, 4]
    assert model[attention + "linear_qkv_lora.B_v"] == [2, 128, 4]
    assert model[mlp + "linear_fc1_lora.B_gate"] == [2, 704, 4]
    assert model[mlp + "linear_fc2_lora.A_fc2"] == [2, 4, 704]
    # The adapters alone: no base weight is saved, and the optimizer holds only adapters' state.
    assert sorted(model) == sorted(k for k in stored if k.startswith("decoder.") and "_lora." in k)
    assert len(model) == 2 * (3 + 1 + 2 + 1)
    assert all("_lora." in k for k in stored if k.startswith("optimizer."))

def test_lora_resumes_exactly_at_tp2(base, uninterrupted, tmp_path):
    """Three steps at TP 2 (two gloo processes), stopped, resumed: the one-process losses."""
    reference = summary(uninterrupted[0])["losses"]
    args = [*SFT, "parallel=tp2pp1", f"checkpoint.load={base}", f"hydra.run.dir={tmp_path}"]
    run_llmtrain(*args, "stage.exit_interval=3")
    assert summary(tmp_path)["losses"] == pytest.approx(reference[:3], rel=1e-5)
    out = run_llmtrain(*args).stdout
    assert "resuming after step 3" in out
    assert summary(tmp_path)["losses"] == pytest.approx(reference[3:], rel=1e-5)


def test_lora_refuses_its_checkpoint_on_another_base(uninterrupted, tmp_path):
    other = tmp_path / "other"
    run_llmtrain(*SMALL, "stage.train_iters=2", "optim.lr=2e-3", f"hydra.run.dir={other}")
    process = run_llmtrain(*SFT, "stage.train_iters=8", f"checkpoint.load={other}/checkpoints",
                           f"hydra.run.dir={uninterrupted[0]}", check=False)
    assert process.returncode == 2
    assert "holds LoRA adapters trained on the base model" in process.stderr
    assert "set checkpoint.load to the base the adapters were trained on" in process.stderr


def test_lora_settings_are_checked_before_anything_starts():
    from llmtrain.config.layout import Machine
    from llmtrain.config.validate import ConfigError, validate

    cfg = compose_config("stage=sft", "peft=lora", "peft.r=0", "peft.target_modules=[q_proj]")
    with pytest.raises(ConfigError) as error:
        validate(cfg, Machine())
    text = str(error.value)
    assert "peft.r=0 must be at least 1" in text
    assert "peft.target_modules=['q_proj']: name one or more of linear_qkv" in text
    assert "give its checkpoint with checkpoint.load=<folder>" in text

    cfg = compose_config("model=gpt2", "stage=sft", "peft=lora", "checkpoint.load=/base",
                         "checkpoint.save_hf=true")
    with pytest.raises(ConfigError) as error:
        validate(cfg, Machine())
    assert ("checkpoint.save_hf with peft=lora writes a PEFT adapter folder, which supports the "
            "llama, qwen3 families, not gpt2") in str(error.value)

    cfg = compose_config("stage=rm", "data=preference", "peft=lora", "checkpoint.load=/base",
                         "checkpoint.save_hf=true")
    with pytest.raises(ConfigError) as error:
        validate(cfg, Machine())
    assert "has no place for a reward model's scalar head: unset checkpoint.save_hf" in str(
        error.value)


def test_adapters_on_the_mlp_keep_transformer_engines_mlp_unfused():
    """Transformer Engine's operation fuser runs the whole MLP as one op: no adapter could add
    to linear_fc1's or linear_fc2's output (found on the H200), so LoRA there goes without it."""
    from llmtrain.config.layout import Machine
    from llmtrain.config.validate import ConfigError, validate
    from llmtrain.megatron.model import te_op_fuser

    gpu = Machine(gpus=1, has_transformer_engine=True)
    lora = ["model=llama3_2_1b", "stage=sft", "data=sft", "peft=lora", "checkpoint.load=/base"]
    for targets, fused in (("[all-linear]", False), ("[linear_fc2]", False),
                           ("[linear_qkv,linear_proj]", True)):
        cfg = compose_config(*lora, f"peft.target_modules={targets}")
        assert te_op_fuser(cfg, validate(cfg, gpu)) is fused, targets
    with pytest.raises(ConfigError, match="or LoRA adapters on linear_fc1/linear_fc2"):
        validate(compose_config(*lora, "precision.use_te_op_fuser=true"), gpu)


def test_adapters_go_out_as_a_peft_folder_and_merged_into_the_base(tiny_llama, tmp_path):
    """A LoRA SFT of a converted Hugging Face Llama; its adapters (checkpoint.save_hf's PEFT
    folder) load with the real `peft` package onto the Hugging Face base and give the logits of the merged export, which the
    converter checked against llmtrain's model with its adapters (at TP 2)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf, mcore = tiny_llama
    run = tmp_path / "run"
    run_llmtrain(f"hydra.searchpath=[file://{mcore}]", "model=hf", f"checkpoint.load={mcore}",
                 *SFT[1:], "stage.train_iters=3", "checkpoint.save_hf=true",
                 f"hydra.run.dir={run}")
    out = run_llmtrain("direction=mcore_to_hf", f"input={run}/checkpoints",
                       f"output={tmp_path / 'merged'}", "tensor_model_parallel_size=2",
                       f"tokenizer={hf}", module="llmtrain.convert").stdout
    assert "top-1 agreement of the logits: 1.000" in out
    adapter = run / "checkpoints" / "hf_iter_0000003"  # checkpoint.save_hf: the PEFT folder

    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(hf)
        plain = base(tokens).logits
        adapted = PeftModel.from_pretrained(base, adapter)(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(tokens).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapters changed the model
    assert torch.allclose(adapted, merged, rtol=1e-4, atol=1e-4), (adapted - merged).abs().max()

    # Generation from the adapter checkpoint (merged on load into the engine's weights) is
    # transformers' greedy continuation on the merged model.
    from inference_helpers import corpus_tokenizer, hf_greedy

    text = "The capital of France is"
    (tmp_path / "prompts.txt").write_text(text + "\n")
    generated = tmp_path / "generated.jsonl"
    run_llmtrain(f"load={run}/checkpoints", f"input={tmp_path / 'prompts.txt'}",
                 f"output={generated}", "sampling.greedy=true",
                 "sampling.num_tokens_to_generate=8", module="llmtrain.generate")
    record = json.loads(generated.read_text().splitlines()[0])
    ids = corpus_tokenizer(hf).encode(text, add_special_tokens=False).ids
    assert record["generated_tokens"] == hf_greedy(tmp_path / "merged", ids, 8)


def lora_against_the_base(base, run, stage: str, data: list, *overrides: str) -> dict:
    """A short peft=lora run of `stage` from `base` on `data` (data=<data kind> and path
    overrides); its metrics. No second copy of the model was loaded for the reference."""
    from rlhf_helpers import TINY

    out = run_llmtrain(f"stage={stage}", *data, *TINY, "model.num_layers=2", "optim.lr=5e-3",
                       "optim.min_lr=5e-3", "stage.micro_batch_size=4",
                       "stage.global_batch_size=8", "peft=lora", f"checkpoint.load={base}",
                       f"hydra.run.dir={run}", "checkpoint.save=null", *overrides).stdout
    assert "(frozen reference)" not in out
    return summary(run)["metrics"]


def test_lora_dpo_raises_the_margin_against_the_base_with_adapters_off(base, tmp_path):
    """The reference is the trained model with its adapters off: the margin starts at 0 (the
    adapters start as a no-op) and rises."""
    from rlhf_helpers import separable_pairs

    data = separable_pairs(tmp_path / "pairs.jsonl", count=64)
    margin = lora_against_the_base(base, tmp_path / "dpo", "dpo",
                                   ["data=preference", f"data.data_path=[{data}]"],
                                   "stage.train_iters=6")["margin"]
    assert margin[0] == pytest.approx(0.0, abs=1e-6)
    assert margin[-1] > margin[0] + 0.1, margin


def test_lora_kto_pulls_desirable_completions_above_the_base_with_adapters_off(base, tmp_path):
    """KTO's reference under peft=lora is the base too: the implicit rewards and the reference
    point start at 0, then the desirable completions rise above the base and the others fall."""
    from rlhf_helpers import separable_unpaired

    data = separable_unpaired(tmp_path / "kto.jsonl", count=64)
    metrics = lora_against_the_base(base, tmp_path / "kto", "kto",
                                    ["data=unpaired", f"data.data_path=[{data}]"],
                                    "stage.train_iters=4")
    good, bad = metrics["reward_desirable"], metrics["reward_undesirable"]
    assert good[0] == pytest.approx(0.0, abs=1e-6) and bad[0] == pytest.approx(0.0, abs=1e-6)
    assert metrics["kl"][0] == pytest.approx(0.0, abs=1e-6)
    assert good[-1] > 0.1 and bad[-1] < 0.0, (good, bad)


def test_adapters_merged_into_a_bf16_base_are_judged_as_bf16(tiny_llama, tmp_path):
    """W + (alpha / r) B A cannot be stored exactly in bf16: the merged export of a LoRA run on
    a bf16 base is checked against the model as it trained within bf16's rounding, not fp32's."""
    hf, _ = tiny_llama
    base, run = tmp_path / "bf16", tmp_path / "run"
    run_llmtrain(f"input={hf}", f"output={base}", "dtype=bf16", module="llmtrain.convert")
    run_llmtrain(f"hydra.searchpath=[file://{base}]", "model=hf", f"checkpoint.load={base}",
                 *SFT[1:], "stage.train_iters=2", f"hydra.run.dir={run}")
    out = run_llmtrain("direction=mcore_to_hf", f"input={run}/checkpoints",
                       f"output={tmp_path / 'merged'}", f"tokenizer={hf}",
                       module="llmtrain.convert").stdout
    assert "tolerance for bf16" in out and "EXCEEDED" not in out
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


def test_lora_reward_model_trains_its_head_beside_the_adapters(base, tmp_path):
    """stage=rm peft=lora: the new scalar head trains with the adapters (the optimizer holds
    their state alone), is saved with them, and the pairs separate."""
    from llmtrain.megatron.checkpoint import stored_tensors
    from rlhf_helpers import TINY, separable_pairs

    data = separable_pairs(tmp_path / "pairs.jsonl", count=64)
    run = tmp_path / "rm"
    out = run_llmtrain("stage=rm", "data=preference", f"data.data_path=[{data}]", *TINY,
                       "model.num_layers=2", "optim.lr=5e-3", "optim.min_lr=5e-3",
                       "stage.micro_batch_size=4", "stage.global_batch_size=8",
                       "stage.train_iters=8", "peft=lora", "peft.r=4",
                       f"checkpoint.load={base}", f"hydra.run.dir={run}").stdout
    assert "LoRA: 8 adapters (r=4) on the frozen base" in out
    assert "37,633 of" in out  # the 2 layers' adapters (18,688 each) and the head's 257
    accuracy = summary(run)["metrics"]["accuracy"]
    assert sum(accuracy[-3:]) / 3 >= 0.9 > accuracy[0], accuracy
    stored = stored_tensors(run / "checkpoints" / "iter_0000008")
    model = sorted(k for k in stored if not k.startswith("optimizer."))
    assert "scalar_head.weight" in model and "scalar_head.bias" in model
    assert all("_lora." in k or k.startswith("scalar_head.") for k in model if "." in k), model
    assert all("_lora." in k or "scalar_head." in k for k in stored if k.startswith("optimizer."))

    # It loads as a reward model (its base, the adapters merged, its head), and scores.
    from functools import partial

    from llmtrain.generate import worker
    from llmtrain.generate.config import compose, register
    from llmtrain.generate.plan import prepare
    from llmtrain.launch.local import launch

    c = compose("generate", register, [f"load={run / 'checkpoints'}", "input=-", "output=-"])
    plan = prepare(c, scores=True)
    assert plan.reward_model
    scores = launch(plan.cfg, plan.layout, entry=partial(
        worker.run, plan, lambda scorer: scorer.score([[5, 6, 7], [8, 9, 10, 11]])))
    assert len(scores) == 2 and scores[0] != scores[1]
    # PPO's critic trains every weight: it cannot start from these adapters (reward_load's).
    from llmtrain.errors import RunStopped
    from llmtrain.megatron.align.critic import _refuse_adapters

    with pytest.raises(RunStopped, match="give stage.alignment.critic_load a whole model"):
        _refuse_adapters(str(run / "checkpoints"))
    _refuse_adapters(str(base))  # a whole model is fine


@pytest.fixture(scope="module")
def confident_base(tmp_path_factory):
    """A random Hugging Face Llama (the corpus tokenizer) with its output layer scaled up 15
    times, converted: its outputs are confident, as a pretrained model's are. On the tiny base
    above, near-uniform, LoRA raises no reward: its output layer is frozen and the final norm
    bounds what the adapters can add to the logits."""
    import torch
    from hf_models import tiny_hf
    from transformers import AutoModelForCausalLM

    from llmtrain.convert import convert

    root = tmp_path_factory.mktemp("confident")
    hf = tiny_hf("llama", root / "hf", tokenizer=True)
    model = AutoModelForCausalLM.from_pretrained(hf)
    with torch.no_grad():
        model.lm_head.weight.mul_(15)
    model.save_pretrained(hf)
    convert(f"input={hf}", f"output={root / 'mcore'}", say=lambda *_: None)
    return root / "mcore"


def test_lora_grpo_raises_the_reward_against_the_base_with_adapters_off(confident_base,
                                                                        tmp_path):
    """stage=grpo peft=lora: rollouts generate with the adapters on, the reference is the base
    with them off (KL 0 at the first step, no second copy loaded), and the reward rises on the
    toy task of test_rlhf_grpo."""
    from rlhf_helpers import ROLLOUTS, TINY, arithmetic_prompts, assert_reward_rises

    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "grpo"
    out = run_llmtrain(f"hydra.searchpath=[file://{confident_base}]", "model=hf",
                       f"checkpoint.load={confident_base}",
                       "data.tokenizer.tokenizer_type=huggingface",
                       f"data.tokenizer.tokenizer_model={confident_base}", "stage=grpo",
                       "data=prompts", f"data.data_path=[{data}]", *TINY, *ROLLOUTS,
                       "optim.lr=2e-2", "optim.min_lr=2e-2", "stage.alignment.group_size=8",
                       "stage.micro_batch_size=16", "stage.global_batch_size=32",
                       "stage.train_iters=10", "peft=lora", f"hydra.run.dir={run}",
                       "checkpoint.save=null").stdout
    assert "(frozen reference)" not in out
    assert "rollouts: decode engine, continuous batching" in out
    metrics = summary(run)["metrics"]
    assert abs(metrics["kl"][0]) < 1e-6 < metrics["kl"][-1], metrics["kl"]
    assert_reward_rises(metrics["reward"])


def test_lora_ppo_trains_the_actors_adapters_and_the_whole_critic(base, tmp_path):
    """stage=ppo peft=lora: the actor is LoRA (its checkpoint the adapters alone, the reference
    the base with them off), the critic trains every weight of its value-head model from the
    base and saves them all."""
    from llmtrain.megatron.checkpoint import stored_tensors
    from rlhf_helpers import ROLLOUTS, TINY, arithmetic_prompts

    data = arithmetic_prompts(tmp_path / "prompts.jsonl")
    run = tmp_path / "ppo"
    out = run_llmtrain("stage=ppo", "data=prompts", f"data.data_path=[{data}]", *TINY,
                       *ROLLOUTS, "model.num_layers=2", "stage.micro_batch_size=4",
                       "stage.global_batch_size=8", "stage.train_iters=1", "peft=lora",
                       f"checkpoint.load={base}", f"hydra.run.dir={run}").stdout
    assert "(frozen reference)" not in out
    assert f"critic: loaded {base / 'iter_0000002'}" in out
    assert abs(summary(run)["metrics"]["kl"][0]) < 1e-6
    actor = stored_tensors(run / "checkpoints" / "iter_0000001")
    critic = stored_tensors(run / "checkpoints" / "critic" / "iter_0000001")
    assert all("_lora." in k for k in actor if k.startswith("decoder."))
    assert "decoder.layers.self_attention.linear_qkv.weight" in critic
    assert "scalar_head.weight" in critic and not any("_lora." in k for k in critic)
