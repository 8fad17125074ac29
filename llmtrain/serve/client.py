"""`python -m llmtrain.serve.client HOST:PORT`: talk to a running server from the terminal.

Like Megatron-LM's tools/text_generation_cli.py it asks for a prompt and a number of tokens and
prints the server's answer (through `PUT /api`), until end of input (Ctrl-D). With --prompt it
answers those prompts and exits; with --chat it holds a conversation through
/v1/chat/completions, printing the reply as it streams.

    python -m llmtrain.serve.client localhost:5000
    python -m llmtrain.serve.client localhost:5000 --prompt "Hello" --tokens-to-generate 32
    python -m llmtrain.serve.client localhost:5000 --chat --temperature 0.7
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


class ServerError(RuntimeError):
    pass


def _base(address: str) -> str:
    return (address if "://" in address else f"http://{address}").rstrip("/")


def _request(url: str, method: str, body: dict, timeout: float):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")
        try:
            parsed = json.loads(detail)
            detail = parsed.get("message") or parsed.get("error", {}).get("message") or detail
        except (ValueError, AttributeError):
            pass
        raise ServerError(f"Error {error.code}: {detail}") from None
    except urllib.error.URLError as error:
        raise ServerError(f"cannot reach {url}: {error.reason}") from None


def generate(base: str, prompts: list[str], tokens: int, args) -> list[str]:
    """Megatron-LM's PUT /api: the prompts with their generations."""
    body = {"prompts": prompts, "tokens_to_generate": tokens}
    for key in ("temperature", "top_k", "top_p", "random_seed"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    with _request(f"{base}/api", "PUT", body, args.timeout) as response:
        return json.loads(response.read())["text"]


def chat(base: str, messages: list[dict], args, out=sys.stdout) -> str:
    """One streamed reply of /v1/chat/completions, printed as it comes; the whole reply."""
    body = {"messages": messages, "stream": True}
    if args.tokens_to_generate:
        body["max_tokens"] = args.tokens_to_generate
    for key in ("temperature", "top_k", "top_p"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.random_seed is not None:
        body["seed"] = args.random_seed
    reply = []
    with _request(f"{base}/v1/chat/completions", "POST", body, args.timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise ServerError(event["error"]["message"])
            piece = event["choices"][0]["delta"].get("content") or ""
            reply.append(piece)
            out.write(piece)
            out.flush()
    out.write("\n")
    return "".join(reply)


def _interactive_megatron(base: str, args) -> None:
    while True:
        try:
            prompt = input("Enter prompt: ")
            tokens = args.tokens_to_generate or int(input("Enter number of tokens to generate: "))
        except EOFError:
            print()
            return
        except ValueError:
            print("the number of tokens must be an integer")
            continue
        try:
            print("Megatron Response: ")
            print(generate(base, [prompt], tokens, args)[0])
        except ServerError as error:
            print(error)


def _interactive_chat(base: str, args) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            said = input("You: ")
        except EOFError:
            print()
            return
        messages.append({"role": "user", "content": said})
        print("Assistant: ", end="", flush=True)
        try:
            messages.append({"role": "assistant", "content": chat(base, messages, args)})
        except ServerError as error:
            messages.pop()
            print(error)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmtrain.serve.client",
        description="Talk to a running `python -m llmtrain.serve` (or Megatron-LM's server).")
    parser.add_argument("address", help="the server, as HOST:PORT or a URL")
    parser.add_argument("--prompt", action="append",
                        help="answer this prompt and exit (repeat for several, sent together)")
    parser.add_argument("--tokens-to-generate", type=int, default=None,
                        help="tokens per answer (asked for interactively when not given; with "
                             "--prompt: 64)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-k", dest="top_k", type=int)
    parser.add_argument("--top-p", dest="top_p", type=float)
    parser.add_argument("--random-seed", dest="random_seed", type=int)
    parser.add_argument("--chat", action="store_true",
                        help="a conversation through /v1/chat/completions, streamed")
    parser.add_argument("--system", help="--chat: the system message")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    args = parser.parse_args(argv)
    base = _base(args.address)
    if args.prompt:
        try:
            if args.chat:
                messages = [{"role": "system", "content": args.system}] if args.system else []
                for prompt in args.prompt:
                    chat(base, messages + [{"role": "user", "content": prompt}], args)
            else:
                for text in generate(base, args.prompt, args.tokens_to_generate or 64, args):
                    print(text)
        except ServerError as error:
            print(error, file=sys.stderr)
            return 1
        return 0
    (_interactive_chat if args.chat else _interactive_megatron)(base, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
