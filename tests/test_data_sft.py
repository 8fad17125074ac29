"""Instruction data: formats and chat templates give loss masks that cover exactly the
assistant's replies, packed sequences never attend across samples, and a tiny SFT run on the
self-cognition set learns while its prompts carry no loss."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import FAST, ROOT, compose_config, run_llmtrain, summary
from data_helpers import (as_alpaca, as_sharegpt, conversations, train_bpe, train_sentencepiece,
                          write_jsonl)
from llmtrain.config.layout import Machine
from llmtrain.config.schema import TokenizerConfig
from llmtrain.config.validate import ConfigError, validate
from llmtrain.data import chat
from llmtrain.data.sources import DataError
from llmtrain.data.tokenizer import load_tokenizer

END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sft_tokenizer")
    train_bpe(directory)
    train_sentencepiece(directory)
    return directory


def hf_tokenizer(directory, model: str = "tokenizer.json"):
    return load_tokenizer(TokenizerConfig(tokenizer_type="huggingface",
                                          tokenizer_model=str(directory / model)))


def trained_runs(ids, mask, tokenizer) -> list[str]:
    """The text of each run of trained tokens."""
    runs, current = [], []
    for token, on in zip(list(ids) + [None], list(mask) + [0]):
        if on:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current, keep_special=True))
            current = []
    return runs


def replies(conversation: dict, template: str) -> list[str]:
    strip = template == "llama3"  # Llama 3 trims message content
    return [(m["content"].strip() if strip else m["content"]) + END[template]
            for m in conversation["messages"] if m["role"] == "assistant"]


@pytest.mark.parametrize("template", ["chatml", "llama3"])
@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca"])
def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer_dir, fmt, template):
    tokenizer = hf_tokenizer(tokenizer_dir)
    chat_template = chat.load_template(template, tokenizer)
    convert = {"messages": dict, "sharegpt": as_sharegpt, "alpaca": as_alpaca}[fmt]
    samples = [c for c in conversations() if fmt != "alpaca" or len(c["messages"]) == 2]
    for number, conversation in enumerate(samples):
        record = convert(conversation)
        messages = chat.to_messages(record, "auto", f"sample {number}")
        ids, mask = chat.encode(messages, chat_template, tokenizer)
        assert trained_runs(ids, mask, tokenizer) == replies(conversation, template)
        prompt = tokenizer.decode([t for t, m in zip(ids, mask) if not m], keep_special=True)
        for message in messages:
            if message["role"] != "assistant":
                assert message["content"] in prompt
                assert message["content"] not in trained_runs(ids, mask, tokenizer)


def test_tokenizer_chat_template_matches_the_named_one(tokenizer_dir):
    """The tokenizer directory's own Jinja chat_template (ChatML here), rendered by transformers,
    gives the same tokens and mask as the chatml template written out in llmtrain."""
    tokenizer = hf_tokenizer(tokenizer_dir, "hf")
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(tokenizer_dir / "hf"))
    for conversation in conversations():
        messages = conversation["messages"]
        own = chat.encode(messages, chat.load_template("tokenizer", tokenizer), tokenizer)
        named = chat.encode(messages, chat.load_template("chatml", tokenizer), tokenizer)
        assert own == named
        assert tokenizer.decode(own[0], keep_special=True) == reference.apply_chat_template(
            messages, tokenize=False)


def test_sentencepiece_with_chatml_tokens(tokenizer_dir):
    tokenizer = load_tokenizer(TokenizerConfig(tokenizer_type="sentencepiece",
                                               tokenizer_model=str(tokenizer_dir / "spm.model")))
    ids, mask = chat.encode(conversations()[0]["messages"], chat.load_template("chatml", tokenizer),
                            tokenizer)
    end = tokenizer.token_id("<|im_end|>")
    assert ids.count(tokenizer.token_id("<|im_start|>")) == 2 and ids.count(end) == 2
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained[-1] == end and tokenizer.decode(trained[:-1]) == "A shard is one piece of the data."
    with pytest.raises(DataError) as error:
        chat.load_template("llama3", tokenizer)
    assert str(error.value) == (
        "chat template llama3 needs the special tokens <|begin_of_text|>, <|start_header_id|>, "
        "<|end_header_id|>, <|eot_id|>, which the tokenizer does not have: choose the template "
        "the model was trained with, or chat_template=tokenizer")


def sft_config(tmp_path, tokenizer_dir, data_path, *overrides, packing=False):
    return compose_config(
        "data=sft", f"data.data_path=[{','.join(map(str, data_path))}]",
        "data.tokenizer.tokenizer_type=huggingface",
        f"data.tokenizer.tokenizer_model={tokenizer_dir / 'tokenizer.json'}",
        f"data.sft.packing={str(packing).lower()}", "data.seq_length=64",
        "stage.micro_batch_size=2", "stage.global_batch_size=4", "stage.train_iters=6",
        "stage.eval_interval=0", "optim.lr_warmup_iters=0", *overrides, output_dir=str(tmp_path))


def segments(position_ids: np.ndarray) -> np.ndarray:
    """Sample number of each position: a sample starts where positions restart at 0."""
    return np.cumsum(position_ids == 0) - 1


@pytest.mark.parametrize("packing", [False, True])
def test_sft_batches_train_only_replies_and_stay_within_samples(tmp_path, tokenizer_dir, packing):
    from llmtrain.megatron.data import build_datasets

    records = conversations() * 4
    source = write_jsonl(tmp_path / "chat.jsonl", records)
    cfg = sft_config(tmp_path, tokenizer_dir, [source], "data.split='100,0,0'",
                     "data.seq_length=128", packing=packing)
    tokenizer = hf_tokenizer(tokenizer_dir)
    train, valid = build_datasets(cfg, validate(cfg, Machine()), tokenizer, str(tmp_path / "cache"))
    assert valid is None  # stage.eval_interval=0: no evaluation
    rows = len(train.plan.rows)
    assert rows < 12 if packing else rows == 12  # conversations of 32 to 102 tokens
    runs = []
    for index in range(rows):  # one epoch
        item = train[index]
        assert item["tokens"].shape == item["labels"].shape == (128,)
        runs += trained_runs(item["labels"], item["loss_mask"], tokenizer)
        seg = segments(item["position_ids"])
        allowed = (seg[:, None] == seg[None, :]) & np.tri(128, dtype=bool)
        assert np.array_equal(item["attention_mask"][0], ~allowed)
        if not packing:
            assert seg.max() <= 1  # the conversation, then its padding
    expected = [reply for c in records for reply in replies(c, "chatml")]
    assert sorted(runs) == sorted(expected)


def test_packed_attention_never_crosses_samples(tmp_path, tokenizer_dir):
    """The tiny model's per-token losses on a packed row equal those of each sample run alone;
    with a plain causal mask (attention across borders) they would not."""
    source = write_jsonl(tmp_path / "chat.jsonl", conversations() * 2)
    script = f"""
import os, sys, torch
sys.path.insert(0, {str(ROOT / 'tests')!r})
from conftest import compose_config
from llmtrain.config.layout import Machine
from llmtrain.config.validate import validate
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.launch.local import free_port
from llmtrain.megatron import parallel
from llmtrain.megatron.data import build_datasets
from llmtrain.megatron.init import initialize
from llmtrain.megatron.model import build_model

cfg = compose_config("model=tiny", "model.num_layers=2", "data=sft",
    "data.data_path=[{source}]", "data.tokenizer.tokenizer_type=huggingface",
    "data.tokenizer.tokenizer_model={tokenizer_dir / 'tokenizer.json'}", "data.sft.packing=true",
    "data.seq_length=128", "data.split='100,0,0'", "stage.micro_batch_size=1",
    "stage.global_batch_size=1", "stage.train_iters=2", "stage.eval_interval=0",
    "optim.lr_warmup_iters=0", output_dir={str(tmp_path)!r})
layout = validate(cfg, Machine())
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
parallel.initialize(layout, cfg.seed)
model = build_model(cfg, layout)[0]
initialize([model], cfg.seed)
model.eval()
train, _ = build_datasets(cfg, layout, load_tokenizer(cfg.data.tokenizer), {str(tmp_path / 'c')!r})
item = max((train[i] for i in range(len(train.plan.rows))), key=lambda it: (it["position_ids"] == 0).sum())
b = {{k: torch.as_tensor(v)[None] for k, v in item.items()}}
starts = torch.nonzero(b["position_ids"][0] == 0).flatten().tolist() + [128]
causal = ~torch.tril(torch.ones(128, 128, dtype=torch.bool))[None, None]
with torch.no_grad():
    packed = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
    leaky = model(b["tokens"], b["position_ids"], causal, labels=b["labels"])
    worst = leak = 0.0
    for a, e in zip(starts[:-1], starts[1:]):
        n = e - a
        alone = model(b["tokens"][:, a:e], torch.arange(n)[None], causal[..., :n, :n],
                      labels=b["labels"][:, a:e])
        worst = max(worst, (packed[:, a:e] - alone).abs().max().item())
        leak = max(leak, (leaky[:, a:e] - alone).abs().max().item())
print("segments", len(starts) - 1, "worst", worst, "leak", leak)
parallel.shutdown()
"""
    process = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-4000:]
    found = re.search(r"segments (\d+) worst (\S+) leak (\S+)", process.stdout)
    segments_, worst, leak = int(found[1]), float(found[2]), float(found[3])
    assert segments_ >= 3  # at least two conversations and the padding
    assert worst < 1e-5
    assert leak > 1e-3


def test_sft_run_learns_and_prompts_carry_no_loss(tmp_path):
    """`python -m llmtrain stage=sft data=sft` on the tiny model with the self-cognition set."""
    name, author = "Zephyrine", "Quill Labs"
    out = run_llmtrain(
        "stage=sft", "data=sft", f"data.sft.model_name={name}",
        f"data.sft.model_author='{author}'", "data.seq_length=256", "data.sft.packing=true",
        "data.split='100,0,0'", "stage.micro_batch_size=2", "stage.global_batch_size=4",
        "stage.epochs=4", "optim.lr=2e-3", "optim.min_lr=2e-4", "checkpoint.save_on_exit=false",
        f"hydra.run.dir={tmp_path}").stdout
    iters = int(re.search(r"stage\.train_iters=(\d+)", out)[1])
    losses = summary(tmp_path)["losses"]
    assert len(losses) == iters >= 8
    assert sum(losses[-3:]) / 3 < losses[0] - 1.5

    # The run trained exactly the replies and their end token: counted here independently.
    from llmtrain.data.selfcognition import conversations as self_cognition

    tokenizer = load_tokenizer(TokenizerConfig())
    expected = sum(len(tokenizer.encode(c["messages"][1]["content"])) + 1
                   for c in self_cognition(name, author))
    assert f"40 for training (packed into" in out
    assert f"; {expected} trained tokens)" in out

    # The cached set the run read, shown as a user inspects it: the question carries no loss.
    cache = next((tmp_path / "data_cache").glob("sft_*_sft.json"))
    prefix = str(cache).removesuffix("_sft.json")
    shown = run_llmtrain("inspect", prefix, "--index", "0", module="llmtrain.data").stdout
    labels = next(line for line in shown.splitlines() if line.startswith("[LABELS]"))
    assert re.fullmatch(rf"\[LABELS\] \[-100 \* \d+\]I am {name}, an AI assistant built by "
                        rf"{author}\. How can I help you today\?<\|im_end\|>\[-100 \* 1\]", labels)


def test_tokenize_sft_writes_a_set_training_reads(tmp_path, tokenizer_dir):
    from llmtrain.megatron.data import build_datasets

    source = write_jsonl(tmp_path / "chat.jsonl", [as_sharegpt(c) for c in conversations()])
    out = run_llmtrain("tokenize", "--sft", "--input", str(source), "--output-prefix",
                       str(tmp_path / "chat"), "--tokenizer-model",
                       str(tokenizer_dir / "tokenizer.json"), "--workers", "2",
                       module="llmtrain.data").stdout
    assert "tokenize: 3 conversations" in out
    tokenizer = hf_tokenizer(tokenizer_dir)
    batches = []
    for data_path in ([tmp_path / "chat"], [source]):
        cfg = sft_config(tmp_path, tokenizer_dir, data_path, "data.split='100,0,0'")
        train, _ = build_datasets(cfg, validate(cfg, Machine()), tokenizer,
                                  str(tmp_path / "cache"))
        batches.append([train[i]["tokens"].tolist() for i in range(3)])
    assert batches[0] == batches[1]  # pre-tokenized and raw give the same sequences
    shown = run_llmtrain("inspect", str(tmp_path / "chat"), "--index", "1",
                         module="llmtrain.data").stdout
    assert shown.splitlines()[0].startswith(f"sample 1 of {tmp_path / 'chat'} (chatml template)")
    assert "[LABELS] [-100 * " in shown and "]alpha<|im_end|>[-100 * " in shown


# Bad input.

@pytest.mark.parametrize("record, message", [
    ({"instruction": "Say hi", "input": ""},
     "line 1: no key 'output' for the alpaca format; the keys present are: 'instruction', "
     "'input'"),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "hello"}]},
     "line 1: conversations[1] is from 'bot'; sharegpt turns are from system, human, user, gpt, "
     "assistant"),
    ({"messages": [{"role": "user", "content": "hi"}]},
     "line 1: the conversation has no assistant turn: nothing to train on"),
    ({"prompt": "hi", "response": "hello"},
     "line 1: cannot tell the format from the keys present ('prompt', 'response'): expected "
     "'messages' (messages), 'conversations' (sharegpt) or 'instruction' and 'output' (alpaca); "
     "set the format explicitly"),
])
def test_bad_conversations_are_named(tmp_path, record, message):
    source = write_jsonl(tmp_path / "bad.jsonl", [record])
    process = run_llmtrain("tokenize", "--sft", "--input", str(source), "--output-prefix",
                           str(tmp_path / "bad"), "--workers", "1", module="llmtrain.data",
                           check=False)
    assert process.returncode == 2
    assert f"{source} {message}" in process.stderr
    assert list(tmp_path.glob("bad_*")) == []


def test_split_with_no_samples_and_ids_beyond_the_vocabulary(tmp_path, tokenizer_dir):
    from llmtrain.megatron.data import build_datasets

    source = write_jsonl(tmp_path / "chat.jsonl", conversations())
    tokenizer = hf_tokenizer(tokenizer_dir)
    cfg = sft_config(tmp_path, tokenizer_dir, [source], "stage.eval_interval=3")
    with pytest.raises(DataError) as error:
        build_datasets(cfg, validate(cfg, Machine()), tokenizer, str(tmp_path / "cache"))
    assert str(error.value) == (
        "the valid split has no samples: data.split=98,2,0 gives it 2.0% of 3 conversations, "
        "which rounds to none: raise its share of data.split or set stage.eval_interval=0")

    cfg = sft_config(tmp_path, tokenizer_dir, [source], "data.split='100,0,0'",
                     "model.vocab_size=300")
    with pytest.raises(DataError) as error:
        build_datasets(cfg, validate(cfg, Machine()), tokenizer, str(tmp_path / "cache"))
    assert re.fullmatch(
        r"the SFT data holds token id (\d+), at or above the vocabulary size 300 of model tiny "
        rf"\(the tokenizer has {tokenizer.vocab_size} tokens\): use the model's tokenizer, or a "
        r"model whose vocab_size is above \1", str(error.value))


def test_sft_config_problems_are_reported_before_anything_runs():
    with pytest.raises(ConfigError) as error:
        validate(compose_config("stage=sft", "data=corpus"), Machine())
    assert error.value.problems == [
        "stage.epochs needs a dataset of known size (data.kind=sft), not data.kind=corpus: set "
        "stage.epochs=null and choose stage.train_iters"]
    gpu = Machine(gpus=1, has_transformer_engine=True)
    with pytest.raises(ConfigError) as error:
        validate(compose_config("stage=sft", "data=sft", "data.sft.packing=true",
                                "data.sft.chat_template=tokenizer", "stage.eval_interval=10",
                                "data.split='100,0,0'", "stage.epochs=0"), gpu)
    assert sorted(error.value.problems) == sorted([
        "the valid split has no samples: data.split=100,0,0 gives it no share; give it one "
        "(e.g. \"data.split='98,2,0'\") or set stage.eval_interval=0",
        "stage.epochs=0 must be at least 1 (or null: run stage.train_iters steps)",
        "data.sft.packing=true on GPUs needs stage.micro_batch_size=1 (packed sequences are one "
        "row of several samples); raise global_batch_size instead",
        "data.sft.chat_template=tokenizer needs a Hugging Face tokenizer directory "
        "(data.tokenizer.tokenizer_type=huggingface); or choose a named template: chatml, llama3",
    ])


def test_packing_plan_fills_rows():
    from llmtrain.data.sft import pack

    lengths = [50, 10, 30, 64, 20, 34, 14, 40]
    rows = pack(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) == -(-sum(lengths) // 64)  # as few rows as the tokens need here


@pytest.mark.slow
def test_resumed_sft_run_continues_exactly(tmp_path):
    """Token-exact resume holds for SFT data too (the samples are a function of the index)."""
    args = [*FAST, "data=sft", "data.split='100,0,0'",
            "stage.train_iters=6", "checkpoint.save_interval=3"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run_llmtrain(*args, f"hydra.run.dir={full}")
    import shutil

    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "iter_0000003", resumed / "checkpoints" / "iter_0000003")
    (resumed / "checkpoints" / "latest_checkpointed_iteration.txt").write_text("3")
    run_llmtrain(*args, f"hydra.run.dir={resumed}")
    assert summary(resumed)["losses"] == summary(full)["losses"][3:]
