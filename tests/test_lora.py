"""peft=lora: adapters on a frozen base, trained for SFT, saved alone, resumed exactly under
another layout, refused on another base."""

from __future__ import annotations

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
    from llmtrain.config.validate import ConfigError, Machine, validate

    cfg = compose_config("stage=sft", "peft=lora", "peft.r=0", "peft.target_modules=[q_proj]")
    with pytest.raises(ConfigError) as error:
        validate(cfg, Machine())
    text = str(error.value)
    assert "peft.r=0 must be at least 1" in text
    assert "peft.target_modules=['q_proj']: name one or more of linear_qkv" in text
    assert "give its checkpoint with checkpoint.load=<folder>" in text
