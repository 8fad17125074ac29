"""Offline generation from a converted checkpoint, as a user runs it, checked against
transformers on the same weights: greedy token for token (ragged batches, repetition penalty,
chat prompts, TP = 2 through the real command), sampling within top-k / top-p, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_llmtrain
from inference_helpers import corpus_tokenizer, hf_greedy, hf_model, stop_ids
from llmtrain.generate import generate
from llmtrain.generate.plan import InferenceError

QUIET = dict(say=lambda *_: None)
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Megatron-Core trains large language models with tensor parallelism", "x"]


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ids(hf, text: str) -> list[int]:
    return corpus_tokenizer(hf).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_generation_equals_transformers(tiny_llama, tmp_path, penalty):
    hf, mcore = tiny_llama
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    # Batches of 3: prompts of different lengths share a batch (prefill to the shortest).
    summary = generate(f"load={mcore}", f"input={prompts}", f"output={out}",
                       "sampling.greedy=true", "sampling.num_tokens_to_generate=12",
                       f"sampling.repetition_penalty={penalty}", "inference_max_batch_size=3",
                       **QUIET)
    records = _read(out)
    assert summary["prompts"] == len(PROMPTS) == len(records)
    for text, record in zip(PROMPTS, records):
        ids = _ids(hf, text)
        assert record["prompt"] == text and record["num_prompt_tokens"] == len(ids)
        expected = hf_greedy(hf, ids, 12, repetition_penalty=penalty)
        assert record["generated_tokens"] == expected, text
        assert record["finish_reason"] == ("stop" if expected[-1] in stop_ids(hf) else "length")


def test_generate_command_with_tensor_parallelism_equals_transformers(tiny_llama, tmp_path):
    hf, mcore = tiny_llama
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                               for i, p in enumerate(PROMPTS[:3])))
    out = tmp_path / "out.jsonl"
    run = run_llmtrain(f"load={mcore}", f"input={prompts}", f"output={out}",
                       "sampling.greedy=true", "sampling.num_tokens_to_generate=10",
                       "tensor_model_parallel_size=2", module="llmtrain.generate")
    assert "TP 2 x PP 1" in run.stderr
    assert "wrote 3 generations" in run.stdout
    for i, record in enumerate(_read(out)):
        assert record["id"] == i  # input keys are carried along
        assert record["generated_tokens"] == hf_greedy(hf, _ids(hf, PROMPTS[i]), 10)


@pytest.mark.slow
def test_generate_with_pipeline_parallelism_equals_transformers(tiny_llama, tmp_path):
    hf, mcore = tiny_llama
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out.jsonl"
    run_llmtrain(f"load={mcore}", f"input={prompts}", f"output={out}", "sampling.greedy=true",
                 "sampling.num_tokens_to_generate=10", "pipeline_model_parallel_size=2",
                 "inference_max_batch_size=2", module="llmtrain.generate")
    for text, record in zip(PROMPTS, _read(out)):
        assert record["generated_tokens"] == hf_greedy(hf, _ids(hf, text), 10)


def test_chat_prompts_use_the_chat_template(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    hf, mcore = tiny_llama
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a prime number."}]
    prompts = tmp_path / "chat.jsonl"
    prompts.write_text(json.dumps({"messages": messages, "ref": "a"}) + "\n"
                       + json.dumps({"prompt": "plain text"}) + "\n")
    out = tmp_path / "out.jsonl"
    generate(f"load={mcore}", f"input={prompts}", f"output={out}", "sampling.greedy=true",
             "sampling.num_tokens_to_generate=6", **QUIET)
    chat, plain = _read(out)
    rendered = AutoTokenizer.from_pretrained(str(hf)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|assistant|>\n")
    ids = _ids(hf, rendered)
    assert chat["messages"] == messages and chat["ref"] == "a"
    assert chat["num_prompt_tokens"] == len(ids)
    assert chat["generated_tokens"] == hf_greedy(hf, ids, 6)
    assert plain["generated_tokens"] == hf_greedy(hf, _ids(hf, "plain text"), 6)


@torch.no_grad()
def _ranks(hf, prompt: list[int], generated: list[int]) -> list[torch.Tensor]:
    """Per generated token, transformers' probabilities at that step, sorted descending, and
    the token's rank among them."""
    logits = hf_model(str(hf))(torch.tensor([prompt + generated])).logits[0].float()
    steps = []
    for i, token in enumerate(generated):
        probs = torch.softmax(logits[len(prompt) - 1 + i], -1)
        order = torch.argsort(probs, descending=True)
        steps.append((probs[order], int((order == token).nonzero())))
    return steps


def test_sampling_stays_within_top_k_and_top_p_and_is_seeded(tiny_llama, tmp_path):
    hf, mcore = tiny_llama
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")

    def run(name, *options):
        out = tmp_path / f"{name}.jsonl"
        generate(f"load={mcore}", f"input={prompts}", f"output={out}", "sampling.ignore_eos=true",
                 "sampling.num_tokens_to_generate=16", *options, **QUIET)
        return [r["generated_tokens"] for r in _read(out)]

    top_k = run("top_k", "sampling.top_k=3", "sampling.temperature=1.5")
    top_p = run("top_p", "sampling.top_p=0.002", "seed=7")
    for text, k_tokens, p_tokens in zip(PROMPTS, top_k, top_p):
        ids = _ids(hf, text)
        assert all(rank < 3 for _, rank in _ranks(hf, ids, k_tokens))
        for probs, rank in _ranks(hf, ids, p_tokens):
            # The nucleus: the most likely tokens until their mass reaches top_p.
            assert float(probs[:rank].sum()) < 0.002
    assert len({tuple(t) for t in top_k}) == 2  # not one fixed answer
    # The same seed gives the same samples; another seed others.
    assert run("again", "sampling.top_p=0.002", "seed=7") == top_p
    assert run("other", "sampling.top_p=0.002", "seed=8") != top_p


@pytest.mark.parametrize("options", [
    ["sampling.top_k=5", "sampling.top_p=0.9", "seed=3"],
    ["sampling.temperature=0.8", "sampling.repetition_penalty=1.2", "seed=4"]])
def test_both_engines_draw_the_same_samples(tiny_llama, tmp_path, options):
    """The decode engine (continuous batching) and Megatron-Core's (engine=megatron, static
    batches) draw each sequence's tokens from the same keyed stream: one is the other's
    reference, in ragged batches of 3."""
    hf, mcore = tiny_llama
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")

    def run(engine, expected):
        out = tmp_path / f"{engine}.jsonl"
        summary = generate(f"load={mcore}", f"input={prompts}", f"output={out}",
                           f"engine={engine}", "sampling.num_tokens_to_generate=12",
                           "inference_max_batch_size=3", *options, **QUIET)
        assert summary["engine"].startswith(expected), summary
        return [r["generated_tokens"] for r in _read(out)]

    decoded = run("auto", "decode engine, continuous batching")
    assert decoded == run("megatron", "Megatron-Core's engine")
    assert len({tuple(t) for t in decoded}) == len(PROMPTS)


def test_bad_input_is_refused_with_what_to_do(tiny_llama, tmp_path):
    hf, mcore = tiny_llama
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\nnot json\n{"text": "no prompt key"}\n')
    with pytest.raises(InferenceError, match=r"line 2: not JSON.*\n.*line 3: needs exactly one"):
        generate(f"load={mcore}", f"input={bad}", f"output={tmp_path / 'o.jsonl'}", **QUIET)
    with pytest.raises(InferenceError, match="holds no checkpoint"):
        generate(f"load={tmp_path}", f"input={bad}", f"output={tmp_path / 'o.jsonl'}", **QUIET)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    with pytest.raises(InferenceError, match="role 'robot'"):
        generate(f"load={mcore}", f"input={chat}", f"output={tmp_path / 'o.jsonl'}", **QUIET)
    with pytest.raises(InferenceError, match="hidden size 64, 4096 embedding rows, 4 layers; "
                                             "model tiny has hidden size 256"):
        generate(f"load={mcore}", "model=tiny", f"input={chat}",
                 f"output={tmp_path / 'o.jsonl'}", **QUIET)
    assert not (tmp_path / "o.jsonl").exists()
    # The command: exit code 2 and the message, no traceback.
    run = run_llmtrain(f"load={mcore}", f"input={bad}", "output=o.jsonl", "sampling.top_p=2",
                       module="llmtrain.generate", check=False)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "llmtrain.generate:" in run.stderr and "line 2: not JSON" in run.stderr


def test_generation_from_a_training_run_finds_its_model_and_tokenizer(tmp_path):
    from llmtrain.data.corpus import corpus_tokenizer_path
    from tokenizers import Tokenizer

    run = tmp_path / "run"
    run_llmtrain("stage.train_iters=2", "optim.lr_warmup_iters=1", "data.seq_length=32",
                 "stage.micro_batch_size=2", "stage.global_batch_size=2",
                 "logging.tensorboard=false", f"hydra.run.dir={run}")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Python is\n")
    out = tmp_path / "out.jsonl"
    generate(f"load={run / 'checkpoints'}", f"input={prompts}", f"output={out}",
             "sampling.num_tokens_to_generate=5", "sampling.ignore_eos=true", **QUIET)
    (record,) = _read(out)
    corpus = Tokenizer.from_file(str(corpus_tokenizer_path()))  # the run's data.tokenizer
    assert record["num_prompt_tokens"] == len(corpus.encode("Python is").ids)
    assert len(record["generated_tokens"]) == 5
    assert record["generated_text"] == corpus.decode(record["generated_tokens"])


@pytest.mark.slow
def test_benchmark_command_runs_and_agrees_with_transformers():
    """The GPU benchmark's command, on the CPU with the tiny model: both peers run, and in fp32
    their greedy tokens agree."""
    run = run_llmtrain("--batch-sizes", "1,2", "--prompt-length", "8", "--new-tokens", "8",
                       "--repeats", "1", "model=tiny", module="llmtrain.generate.bench")
    rows = [line.split() for line in run.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(row[-1] == "100%" and float(row[1].replace(",", "")) > 0 for row in rows)


def test_auto_engine_takes_megatron_cores_for_a_mixture_of_experts_and_says_why(tmp_path):
    """GLM-4.5 (MoE): the decode engine does not cover it, so engine=auto takes Megatron-Core's."""
    from hf_models import tiny_hf
    from llmtrain.convert import convert

    hf, mcore = tiny_hf("glm4_moe", tmp_path / "hf", tokenizer=True), tmp_path / "mcore"
    convert(f"input={hf}", f"output={mcore}", "check=false", **QUIET)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The capital of France is"}\n')
    summary = generate(f"load={mcore}", f"input={prompts}", f"output={tmp_path / 'o.jsonl'}",
                       "sampling.num_tokens_to_generate=2", **QUIET)
    assert summary["engine"] == ("Megatron-Core's engine, static batches (mixture-of-experts or "
                                 "multi-latent attention)")
