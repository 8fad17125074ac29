"""The server, as users talk to it: the official `openai` client (completions, chat, streaming,
logprobs with echo), Megatron-LM's PUT /api and the command-line client, many clients at once
(batched together), malformed requests (4xx, and the server keeps serving). One real
`python -m llmtrain.serve` process serves the whole module on a free port; answers are checked
against transformers on the same weights."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from conftest import ROOT
from inference_helpers import (
    ServerProcess,
    corpus_tokenizer,
    hf_greedy,
    hf_logprobs,
    stop_ids,
)


@pytest.fixture(scope="module")
def served(tiny_llama):
    hf, mcore = tiny_llama
    server = ServerProcess(f"load={mcore}", "inference_max_batch_size=8",
                           "batch_wait_ms=300", "served_model_name=tiny",
                           "max_request_bytes=100000")
    yield server, hf
    assert server.stop() == 0, server.output[-3000:]
    assert "[serve] stopped" in server.output


def _ids(hf, text: str) -> list[int]:
    return corpus_tokenizer(hf).encode(text, add_special_tokens=False).ids


def _text(hf, tokens: list[int]) -> str:
    """The text the server shows for generated tokens: without the end token that stopped it."""
    if tokens and tokens[-1] in stop_ids(hf):
        tokens = tokens[:-1]
    return corpus_tokenizer(hf).decode(tokens)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_client_completions_chat_and_streaming(served):
    from transformers import AutoTokenizer

    server, hf = served
    client = _client(server)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = "The capital of France is"
    expected = _text(hf, hf_greedy(hf, _ids(hf, prompt), 8))

    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    assert done.choices[0].text == expected
    assert done.usage.prompt_tokens == len(_ids(hf, prompt))
    assert done.usage.completion_tokens == 8

    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=8,
                                            temperature=0, stream=True))
    assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": "Say something."}]
    rendered = AutoTokenizer.from_pretrained(str(hf)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    chat_expected = _text(hf, hf_greedy(hf, _ids(hf, rendered), 6))
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == chat_expected
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == \
        chat_expected
    assert stream[-1].usage.completion_tokens == 6

    # Scoring as lm-evaluation-harness does it: the prompt's log-probabilities, echoed.
    ids = _ids(hf, "Megatron-Core trains large language models")
    scored = client.completions.create(model="tiny", prompt=ids, max_tokens=1, temperature=0,
                                       echo=True, logprobs=1)
    logprobs = scored.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and len(logprobs.token_logprobs) == len(ids) + 1
    reference = hf_logprobs(hf, ids).tolist()
    assert logprobs.token_logprobs[1:-1] == pytest.approx(reference, abs=1e-4)
    assert all(max(top.values()) >= value for top, value in
               zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:]))

    # A stop string ends the text before it.
    stop = expected[len(expected) // 2:][:3]
    cut = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == expected[:expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    # n samples per prompt, reproducible with a seed.
    first = client.completions.create(model="tiny", prompt=[prompt, "x"], max_tokens=5, n=2,
                                      seed=3)
    again = client.completions.create(model="tiny", prompt=[prompt, "x"], max_tokens=5, n=2,
                                      seed=3)
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]

    with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens"):
        client.completions.create(model="tiny", prompt=prompt, max_tokens=500)


def test_megatron_api_and_its_command_line_client(served):
    server, hf = served
    prompts = ["Hello world", "The capital of France is"]
    status, answer = server.send("/api", {"prompts": prompts, "tokens_to_generate": 8,
                                          "top_k": 1, "logprobs": True}, method="PUT")
    assert status == 200
    for i, prompt in enumerate(prompts):
        ids = _ids(hf, prompt)
        generated = hf_greedy(hf, ids, 8)
        assert answer["text"][i] == prompt + _text(hf, generated)
        shown = generated[:-1] if generated[-1] in stop_ids(hf) else generated
        assert answer["tokens"][i] == ids + shown
        assert len(answer["logprobs"][i]) == len(ids) + len(shown) - 1
        assert answer["logprobs"][i][:len(ids) - 1] == pytest.approx(
            hf_logprobs(hf, ids).tolist(), abs=1e-4)

    address = server.url.removeprefix("http://")
    env = {"PYTHONPATH": str(ROOT)}
    once = subprocess.run([sys.executable, "-m", "llmtrain.serve.client", address, "--prompt",
                           prompts[0], "--tokens-to-generate", "8", "--top-k", "1"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert once.returncode == 0, once.stderr
    assert once.stdout == answer["text"][0] + "\n"
    # Interactive, as Megatron-LM's tools/text_generation_cli.py asks.
    talk = subprocess.run([sys.executable, "-m", "llmtrain.serve.client", address, "--top-k",
                           "1"], input=f"{prompts[1]}\n8\n", capture_output=True, text=True,
                          timeout=300, env=env)
    assert talk.returncode == 0, talk.stderr
    assert talk.stdout.startswith("Enter prompt: Enter number of tokens to generate: "
                                  "Megatron Response: \n" + answer["text"][1] + "\n")
    refused = subprocess.run([sys.executable, "-m", "llmtrain.serve.client", address, "--prompt",
                              "x", "--top-k", "3", "--top-p", "0.5"], capture_output=True,
                             text=True, timeout=300, env=env)
    assert refused.returncode == 1
    assert "Error 400: cannot set both top-k and top-p samplings." in refused.stderr


def test_concurrent_requests_all_complete_batched_together(served):
    server, hf = served
    before = server.get("/metrics?format=json")
    prompts = [f"Request number {i} says" for i in range(8)]

    def ask(prompt):
        return _client(server).completions.create(model="tiny", prompt=prompt, max_tokens=6,
                                                  temperature=0).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(ask, prompts))
    # Each answer is its own prompt's, whatever it was batched with.
    assert answers == [_text(hf, hf_greedy(hf, _ids(hf, p), 6)) for p in prompts]
    after = server.get("/metrics?format=json")
    assert after["requests"] - before["requests"] == 8
    assert after["max_batch_size"] > 1, after
    batches = after["batches"] - before["batches"]
    assert batches < 8, after
    assert "sequence(s) from" in server.output


MALFORMED = [
    ("POST", "/v1/completions", b"{not json", 400, "JSON"),
    ("POST", "/v1/completions", {"prompt": 5}, 400, "prompt: expected one of"),
    ("POST", "/v1/completions", {"max_tokens": 3}, 400, "prompt: Field required"),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "does not exist"),
    ("POST", "/v1/completions", {"prompt": [[]]}, 400, "the prompt is empty"),
    ("POST", "/v1/completions", {"prompt": [10 ** 6]}, 400, "token ids must lie in 0..4095"),
    ("POST", "/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400,
     "use repetition_penalty"),
    ("POST", "/v1/completions", {"prompt": "x", "top_k": 10 ** 6}, 400, "top_k=1000000"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400,
     "role"),
    ("PUT", "/api", {}, 400, "prompts argument required"),
    ("PUT", "/api", {"prompts": "x"}, 400, "prompts is not a list of strings"),
    ("PUT", "/api", {"prompts": ["x"], "top_k": 2, "top_p": 0.5}, 400, "cannot set both"),
    ("PUT", "/api", {"prompts": ["x"], "tokens_to_generate": 0}, 400,
     "tokens_to_generate=0 implies logprobs should be True"),
    ("POST", "/detokenize", {"tokens": ["a"]}, 400, "detokenize takes"),
    # Text that is not Unicode (JSON's escapes carry lone surrogates), before any tokenizer.
    ("POST", "/v1/completions", {"prompt": "a\ud800b"}, 400,
     "prompt holds text that is not valid Unicode (a lone surrogate, '\\ud800', at character 1)"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]},
     400, "messages[0].content holds text that is not valid Unicode"),
    ("PUT", "/api", {"prompts": ["\ud800"]}, 400, "prompts[0] holds text that is not valid"),
    ("POST", "/tokenize", {"prompt": "\ud800"}, 400, "not valid Unicode"),
    ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, "error parsing the body"),
    # A body over max_request_bytes (100000 here) is refused before it is read.
    ("POST", "/v1/completions", b" " * 150_000, 413,
     "the request body is 150000 bytes, over this server's limit of 100000 (max_request_bytes)"),
    # ... and so is a chunked one without a Content-Length, once what arrived passes the limit.
    ("POST", "/v1/completions", (b" " * 60_000,) * 3, 413,
     "the request body is over 120000 bytes, over this server's limit of 100000"),
    ("PUT", "/api", (b" " * 60_000,) * 3, 413, "over this server's limit of 100000"),
    ("GET", "/v1/models/gpt-4", None, 404, "The model `gpt-4` does not exist"),
    ("POST", "/v1/completions", {"prompt": "x", "seed": 2 ** 64}, 400,
     "seed: Input should be less than 9223372036854775808"),
]


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(served):
    server, hf = served
    for method, path, body, status, fragment in MALFORMED:
        got, answer = server.send(path, body, method=method)
        message = answer.get("message") or answer.get("error", {}).get("message", "")
        assert got == status and fragment in message, (path, body, got, answer)
    assert server.get("/health") == {"status": "ok"}
    status, answer = server.send("/v1/completions", {"prompt": "Still here", "max_tokens": 4,
                                                     "temperature": 0})
    assert status == 200
    assert answer["choices"][0]["text"] == _text(hf, hf_greedy(hf, _ids(hf, "Still here"), 4))


def test_tokenizer_endpoints(served):
    server, hf = served
    info = server.get("/tokenizer_info")
    assert info["eos_token"] == "<|endoftext|>" and "<|assistant|>" in info["chat_template"]
    status, answer = server.send("/tokenize", {"prompt": "Hello world"})
    assert status == 200 and answer["tokens"] == _ids(hf, "Hello world")
    status, answer = server.send("/detokenize", {"tokens": _ids(hf, "Hello world")})
    assert answer == {"prompt": "Hello world"}


def test_what_openai_ecosystem_clients_send_is_served(served):
    """Fields this server does not know are ignored with a line in its log (as vLLM does), the
    `developer` role is the system's, GET /v1/models/<id> describes the model, a stop string
    is the choice's stop_reason, and /metrics speaks Prometheus."""
    server, hf = served
    client = _client(server)
    answer = client.completions.create(model="tiny", prompt="Still here", max_tokens=4,
                                       temperature=0, extra_body={"frobnicate": 1})
    assert answer.choices[0].text == _text(hf, hf_greedy(hf, _ids(hf, "Still here"), 4))
    assert ("[serve] /v1/completions: ignored the field(s) this server does not know: "
            "frobnicate") in server.output

    def chat(role):
        return client.chat.completions.create(
            model="tiny", max_tokens=6, temperature=0,
            messages=[{"role": role, "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        ).choices[0].message.content
    assert chat("developer") == chat("system")

    assert client.models.retrieve("tiny").id == "tiny"

    def seeded():
        return [tuple(c.logprobs.tokens) for c in client.completions.create(
            model="tiny", prompt="Still here", max_tokens=8, temperature=1.0, n=3, seed=5,
            logprobs=0).choices]
    first = seeded()
    assert seeded() == first  # reproducible, and each choice its own stream, not another's
    assert len(set(first)) == 3  # shifted by a token:
    assert not any(a[1:] == b[:-1] for a in first for b in first if a != b)

    full = client.completions.create(model="tiny", prompt="Still here", max_tokens=8,
                                     temperature=0).choices[0].text
    stop = full[2:4]  # a stop string inside the greedy answer
    stopped = client.completions.create(model="tiny", prompt="Still here", max_tokens=8,
                                        temperature=0, stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == full[:full.find(stop)]
    assert stopped.model_extra["stop_reason"] == stop
    plain = client.completions.create(model="tiny", prompt="Still here", max_tokens=2,
                                      temperature=0).choices[0]
    assert plain.model_extra["stop_reason"] is None

    import urllib.request

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=60) as response:
        text = response.read().decode()
    assert response.headers["Content-Type"].startswith("text/plain")
    assert "# TYPE llmtrain_requests counter" in text
    assert any(line.startswith("llmtrain_requests ") and int(line.split()[1]) >= 4
               for line in text.splitlines()), text


def test_logprobs_cover_an_end_token_as_usage_counts_it(tiny_llama):
    """lm-evaluation-harness's local-completions asks for max_tokens=1 with echo and logprobs,
    and drops the last log-probability as the generated token's: when that token is the end
    token, which the text leaves out, its log-probability must still be there (else lm-eval
    drops the prompt's last one and scores the wrong tokens)."""
    from llmtrain.config.schema import TokenizerConfig
    from llmtrain.data.tokenizer import load_tokenizer
    from llmtrain.generate.sequence import Output, Sampling, Sequence
    from llmtrain.generate.text import Text
    from llmtrain.serve.batcher import Choice
    from llmtrain.serve.openai_api import CompletionRequest, Server

    hf, _ = tiny_llama
    text = Text(load_tokenizer(TokenizerConfig(tokenizer_type="huggingface",
                                               tokenizer_model=str(hf))), 4096)
    end = text.stop_ids[0]
    prompt = _ids(hf, "The capital of France is")
    request = CompletionRequest(prompt=prompt, max_tokens=1, logprobs=1, echo=True)
    choice = Choice(Sequence(prompt, 1, Sampling(temperature=0), text.stop_ids), 0)
    made = Output(tokens=[end], finish_reason="stop", logprobs=[-0.25],
                  top_logprobs=[[(end, -0.25)]],
                  prompt_logprobs=[None] + [-1.0] * (len(prompt) - 1),
                  prompt_top_logprobs=[None] * len(prompt))
    answer = Server(text, "tiny", 64).completion_choice(request, choice, made, "", "")
    assert answer["text"] == ""  # the end token is not text ...
    logprobs = answer["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(prompt) + 1  # ... but it has its logprob
    assert logprobs["token_logprobs"][-1] == -0.25
    assert logprobs["token_logprobs"][1:len(prompt)] == [-1.0] * (len(prompt) - 1)
