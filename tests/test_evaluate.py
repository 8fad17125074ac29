"""Evaluation as a user runs it: lm-evaluation-harness on small local tasks (a YAML task over a
local JSON-lines file each; nothing is downloaded) against a server started from the checkpoint,
and against the Hugging Face model with transformers; perplexity on an indexed dataset. Scores
are checked against transformers on the same weights."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_llmtrain
from inference_helpers import corpus_tokenizer, hf_greedy, hf_logprobs, stop_ids
from llmtrain.evaluate import evaluate
from llmtrain.generate.plan import InferenceError

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
QUESTIONS = [("What is two plus two?", ["four", "five", "a fish"], 0),
             ("Which one is a colour?", ["blue", "seven", "running"], 0),
             ("Where is Paris?", ["in the sea", "France", "on the moon"], 1),
             ("What do cats say?", ["woof", "moo", "meow"], 2),
             ("Pick a number.", ["ten", "purple", "quickly"], 0)]
GEN_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
               "Megatron-Core"]
MAX_GEN = 8


def _ids(hf, text: str) -> list[int]:
    return corpus_tokenizer(hf).encode(text, add_special_tokens=False).ids


def _expected_accuracy(hf) -> float:
    """lm-eval's multiple choice by hand: the choice whose continuation is most likely."""
    right = 0
    for question, choices, label in QUESTIONS:
        context = f"Question: {question}\nAnswer:"
        scores = []
        for choice in choices:
            ctx, whole = _ids(hf, context), _ids(hf, f"{context} {choice}")
            scores.append(float(hf_logprobs(hf, whole)[len(ctx) - 1:].sum()))
        right += scores.index(max(scores)) == label
    return right / len(QUESTIONS)


def _greedy_answer(hf, prompt: str) -> str:
    tokens = hf_greedy(hf, _ids(hf, prompt), MAX_GEN)
    if tokens and tokens[-1] in stop_ids(hf):
        tokens = tokens[:-1]
    return corpus_tokenizer(hf).decode(tokens).split("\n")[0]


def _tasks(folder, hf) -> str:
    """Two local tasks: multiple choice (log-likelihoods) and generation (greedy, until a
    newline; half the references are the greedy answers, so exact match is 0.5 exactly)."""
    folder.mkdir()
    (folder / "mc.jsonl").write_text("".join(
        json.dumps({"question": q, "choices": c, "label": label}) + "\n"
        for q, c, label in QUESTIONS))
    (folder / "gen.jsonl").write_text("".join(
        json.dumps({"question": p, "answer": _greedy_answer(hf, p) if i % 2 == 0 else "nope"})
        + "\n" for i, p in enumerate(GEN_PROMPTS)))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    (folder / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return str(folder)


def _indexed_dataset(hf, prefix) -> list[int]:
    from llmtrain.data.indexed import IndexedDatasetWriter

    eod = stop_ids(hf)[0]
    texts = ["The quick brown fox jumps over the lazy dog. " * 3,
             "def add(a, b):\n    return a + b",
             "Megatron-Core trains large language models with tensor parallelism."]
    stream = []
    with IndexedDatasetWriter(prefix, vocab_size=4096) as writer:
        for text in texts:
            ids = _ids(hf, text) + [eod]
            writer.add_document(ids)
            stream += ids
    return stream


def test_lm_eval_and_perplexity_against_a_server_started_from_the_checkpoint(
        tiny_llama, tmp_path):
    hf, mcore = tiny_llama
    tasks = _tasks(tmp_path / "tasks", hf)
    stream = _indexed_dataset(hf, tmp_path / "heldout_text_document")
    out = tmp_path / "results"
    run = run_llmtrain(f"load={mcore}", "tasks=[tiny_mc,tiny_gen]", f"include_path={tasks}",
                       f"max_gen_toks={MAX_GEN}", "batch_size=4",
                       f"perplexity.data_path=[{tmp_path / 'heldout_text_document'}]",
                       "perplexity.seq_length=32", f"output_dir={out}",
                       module="llmtrain.evaluate",
                       env={**OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "cache")})
    assert "[serve] ready" in run.stderr  # the server it started ...
    assert "[serve] stopped" in run.stderr  # ... and stopped
    assert "|tiny_mc " in run.stdout and "|tiny_gen" in run.stdout and "Perplexity" in run.stdout
    report = json.loads((out / "results.json").read_text())
    assert (out / "results.md").read_text() in run.stdout
    assert report["lm_eval"]["results"]["tiny_mc"]["acc,none"] == pytest.approx(
        _expected_accuracy(hf), abs=1e-9)
    assert report["lm_eval"]["results"]["tiny_gen"]["exact_match,none"] == 0.5

    # Perplexity: documents end to end in windows of 32 tokens, every token but a window's
    # first scored.
    values = []
    for start in range(0, len(stream), 32):
        window = stream[start:start + 32]
        if len(window) > 1:
            values += hf_logprobs(hf, window).tolist()
    (scored,) = report["perplexity"].values()
    assert scored["tokens"] == len(values) and scored["windows"] == math.ceil(len(stream) / 32)
    assert scored["perplexity"] == pytest.approx(math.exp(-sum(values) / len(values)), rel=1e-5)


def test_lm_eval_on_the_hugging_face_model_scores_the_same(tiny_llama, tmp_path, monkeypatch):
    hf, _ = tiny_llama
    for key, value in {**OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    tasks = _tasks(tmp_path / "tasks", hf)
    report = evaluate(f"hf={hf}", "tasks=[tiny_mc]", f"include_path={tasks}", "batch_size=4",
                      f"output_dir={tmp_path / 'results'}", say=lambda *_: None)
    assert report["lm_eval"]["results"]["tiny_mc"]["acc,none"] == pytest.approx(
        _expected_accuracy(hf), abs=1e-9)


def test_bad_evaluation_requests_say_what_to_do(tiny_llama, tmp_path):
    hf, mcore = tiny_llama
    with pytest.raises(InferenceError, match="exactly one of server=.*load=.*hf="):
        evaluate(f"load={mcore}", f"hf={hf}", "tasks=[x]", say=lambda *_: None)
    with pytest.raises(InferenceError, match="nothing to evaluate"):
        evaluate(f"load={mcore}", say=lambda *_: None)
    with pytest.raises(InferenceError, match=r"missing\.bin and .*missing\.idx do\(es\) not"):
        evaluate(f"load={mcore}", f"perplexity.data_path=[{tmp_path / 'missing'}]",
                 say=lambda *_: None)
    with pytest.raises(InferenceError, match="no llmtrain server answers at http://127.0.0.1:9"):
        evaluate("server=http://127.0.0.1:9", "tasks=[x]", say=lambda *_: None)
    # A server that cannot start says so at once, with its status, rather than after the timeout.
    from llmtrain.evaluate.server import started

    with pytest.raises(InferenceError, match="the server exited with status 2 before it was"):
        with started(str(mcore), ["engine=no_such_engine"], timeout=600):
            pass
