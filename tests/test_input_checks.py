"""Bad input to a training launch, refused before any process starts (exit 2), as a user meets it.

Each mistake is a real file (a dataset missing its index, a damaged tokenizer, a mistyped
checkpoint path); the command must name it with what to do and leave no run behind.
"""

from __future__ import annotations

import re
import shutil
import typing

from conftest import FAST, compose_config, run_llmtrain
from llmtrain.config import inputs, overrides
from llmtrain.config.layout import Machine
from llmtrain.config.validate import ConfigError, validate
from llmtrain.data.corpus import corpus_prefix, corpus_tokenizer_path

CPU = Machine(gpus=0, has_transformer_engine=False)


def _refused(*args: str):
    """Run the command; it must exit 2 before training and return its stderr."""
    process = run_llmtrain(*args, check=False, timeout=300)
    assert process.returncode == 2, process.stdout[-2000:] + process.stderr[-4000:]
    assert "training tiny" not in process.stdout
    return process.stderr


def _problems(cfg) -> list[str]:
    try:
        validate(cfg, CPU)
    except ConfigError as error:
        return error.problems
    return []


def test_a_mistyped_checkpoint_load_is_refused_before_launch(tmp_path):
    missing = tmp_path / "ckpts" / "llama3_2_1b"
    for finetune in ("false", "true"):
        out = tmp_path / f"run_{finetune}"
        err = _refused(*FAST, "stage.train_iters=4", f"checkpoint.load={missing}",
                       f"checkpoint.finetune={finetune}", f"output_dir={out}")
        assert f"checkpoint.load={missing} does not exist, so there is nothing to " in err
        assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()
    # An existing folder without any step is as bad; a step folder names its parent and step.
    missing.mkdir(parents=True)
    step = missing / "iter_0000050"
    step.mkdir()
    cfg = compose_config(f"checkpoint.load={step}", output_dir=str(tmp_path / "run"))
    assert inputs.checkpoint_problems(cfg) == [
        f"checkpoint.load={step} is one step's folder: give the folder that holds it, "
        f"checkpoint.load={missing} checkpoint.load_step=50"]
    step.rmdir()
    cfg = compose_config(f"checkpoint.load={missing}", output_dir=str(tmp_path / "run"))
    assert "holds no checkpoint" in inputs.checkpoint_problems(cfg)[0]
    # The run's own save folder as load (one folder for --load and --save) starts fresh.
    cfg = compose_config(f"checkpoint.load={tmp_path / 'run' / 'checkpoints'}",
                         output_dir=str(tmp_path / "run"))
    assert inputs.checkpoint_problems(cfg) == []


def test_every_data_path_and_the_tokenizer_are_checked_before_any_process_starts(tmp_path):
    whole, half = tmp_path / "whole_text_document", tmp_path / "half_text_document"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{corpus_prefix()}{suffix}", f"{whole}{suffix}")
    shutil.copy(f"{corpus_prefix()}.bin", f"{half}.bin")
    out = tmp_path / "run"
    err = _refused(*FAST, "stage.train_iters=4", "data=indexed", "model=tiny",
                   f"data.data_path=[0.5,{whole},0.5,{half}]",
                   f"data.tokenizer.tokenizer_model={tmp_path / 'no_tokenizer'}",
                   "data.seq_length=64", f"output_dir={out}")
    assert (f"data.data_path entry {half}: {half}.bin exists but {half}.idx does not" in err)
    assert f"{whole}" not in err.replace(f"{half}", "")
    assert f"data.tokenizer: {tmp_path / 'no_tokenizer'} does not exist" in err
    assert not (out / "data_cache").exists() and not (out / "checkpoints").exists()
    # A .bin named instead of its prefix is answered with the prefix.
    cfg = compose_config("data=indexed", f"data.data_path=[{whole}.bin]",
                         f"data.tokenizer.tokenizer_model={corpus_tokenizer_path()}")
    assert inputs.data_path_problems(cfg) == [
        f"data.data_path entry {whole}.bin names a file: give its prefix, {whole} (Megatron "
        f"reads {whole}.bin and {whole}.idx)"]


def test_sft_entries_are_files_sets_of_tokenize_sft_or_generated(tmp_path):
    (tmp_path / "chat.jsonl").write_text('{"messages": []}\n')
    (tmp_path / "big_sft.json").write_text("{}")  # the last file `tokenize --sft` writes
    entries = [tmp_path / "chat.jsonl", tmp_path / "big", "self-cognition", tmp_path / "typo"]
    cfg = compose_config("stage=sft", "data=sft", f"data.data_path=[{','.join(map(str, entries))}]")
    assert inputs.data_path_problems(cfg) == [
        f"data.data_path entry {tmp_path / 'typo'}: no such file, and no tokenized set of that "
        f"prefix; entries are json/jsonl/parquet files, prefixes written by `python -m "
        f"llmtrain.data tokenize`, or self-cognition / arithmetic"]


def test_a_tokenizer_too_large_or_unreadable_is_refused(tmp_path):
    tokenizer = corpus_tokenizer_path()
    big = compose_config("data.tokenizer.tokenizer_type=huggingface",
                         f"data.tokenizer.tokenizer_model={tokenizer}", "model.vocab_size=1000")
    assert inputs.tokenizer_problems(big) == [
        "the tokenizer has 4096 tokens but model tiny has vocab_size 1000: use a model whose "
        "vocabulary holds the tokenizer's (or model.vocab_size=4096 to train one from scratch)"]
    damaged = tmp_path / "tokenizer.json"
    damaged.write_text(tokenizer.read_text()[:5000])  # cut off, as by a failed download
    cfg = compose_config("data.tokenizer.tokenizer_type=huggingface",
                         f"data.tokenizer.tokenizer_model={tmp_path}")
    [problem] = inputs.tokenizer_problems(cfg)
    assert problem.startswith(f"data.tokenizer: the huggingface tokenizer at {tmp_path} cannot be "
                              f"read (")
    fits = compose_config("data.tokenizer.tokenizer_type=huggingface",
                          f"data.tokenizer.tokenizer_model={tokenizer}")
    assert inputs.tokenizer_problems(fits) == []


def test_a_negative_learning_rate_and_an_added_unknown_key_are_refused():
    assert _problems(compose_config("optim.lr=-1e-4", "optim.min_lr=-1e-5")) == [
        "optim.lr=-0.0001 is negative: a learning rate is 0 or more (e.g. optim.lr=3e-4)",
        "optim.min_lr=-1e-05 is negative: a learning rate is 0 or more (e.g. optim.min_lr=3e-5)"]
    fields = typing.get_type_hints(type(compose_config().stage))
    assert overrides.problems(["+stage.foo=1", "+launcher.env.NCCL_DEBUG=INFO"]) == [
        f"stage.foo is not a setting: the fields of stage are: {', '.join(fields)}"]


def test_a_sequence_longer_than_a_rope_models_positions_needs_it_said():
    assert _problems(compose_config("model=llama3_8b", "data.seq_length=16384")) == [
        "data.seq_length=16384 exceeds the 8192 positions model llama3_8b was made for "
        "(max_position_embeddings) and no RoPE scaling extends them: set data.seq_length=8192 "
        "or less, or, to train longer contexts on purpose, model.max_position_embeddings=16384"]
    assert _problems(compose_config("model=llama3_8b", "data.seq_length=16384",
                                    "model.max_position_embeddings=16384")) == []
    # Llama 3.1's scaled RoPE holds its 131072 positions.
    assert _problems(compose_config("model=llama3_1_8b", "data.seq_length=16384")) == []


def test_a_plan_larger_than_the_machine_is_refused_with_its_figures(tmp_path):
    """A 70B model in fp32 on this CPU: about 1 TiB per process, more memory than any host and
    more disk than this one has free for its first checkpoint."""
    out = tmp_path / "run"
    err = _refused("model=llama3_1_70b", "stage.eval_interval=0",
                   f"output_dir={out}")
    memory = re.search(r"the plan needs about ([0-9.]+) GiB per process x 1 process\(es\) = "
                       r"[0-9.]+ GiB of memory, but this machine has ([0-9.]+) GiB: choose a "
                       r"smaller model", err)
    assert memory and float(memory[1]) > float(memory[2]), err
    assert "; or add device=cpu to start anyway" in err
    assert re.search(rf"not enough free disk space for checkpoints in {out}/checkpoints: one "
                     rf"step of model llama3_1_70b takes about [0-9.]+ GiB", err)
    assert not (out / "checkpoints").exists()
    # device=cpu insists: the memory is a warning; the disk is still too small.
    cfg = compose_config("model=llama3_1_70b", "device=cpu", output_dir=str(out))
    found, warnings = inputs.problems(cfg, validate(cfg, CPU))
    assert [p[:30] for p in found] == ["not enough free disk space for"]
    assert warnings[0].startswith("warning: the plan needs about ")
    assert warnings[0].endswith("(starting anyway: device=cpu was given)")
    tiny = compose_config(output_dir=str(out))
    assert inputs.problems(tiny, validate(tiny, CPU)) == ([], [])


def test_the_plan_of_a_packed_sft_run_shows_the_steps_that_run(tmp_path):
    sft = ["stage=sft", "data=sft", "data.sft.packing=true", "data.seq_length=256",
           "data.split='100,0,0'", "stage.micro_batch_size=1", "stage.global_batch_size=4",
           "stage.epochs=1", "optim.lr_warmup_iters=0", "checkpoint.save=null",
           "logging.tensorboard=false", f"hydra.run.dir={tmp_path}"]
    planned = run_llmtrain(*sft, "dry_run=true").stdout
    assert ("schedule     stage.epochs=1: the steps are counted from the data when the run "
            "starts;") in planned
    out = run_llmtrain(*sft).stdout
    steps = int(re.search(r"stage\.train_iters=(\d+)", out)[1])
    assert f"schedule     {steps} steps = " in out and "B tokens (1 epoch(s)); lr" in out
    assert out.index("stage.train_iters=") < out.index("schedule ") < out.index(
        f"training tiny for {steps} steps")
