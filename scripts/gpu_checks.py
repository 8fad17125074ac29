"""The Python side of scripts/gpu_checks.sh: the model it starts from, and the one-line summaries
it prints from what the commands wrote (summary.json of a run, the answers of generate).

    python scripts/gpu_checks.py hf-model model=llama3_2_1b --output hf_llama3_2_1b --dtype bf16
    python scripts/gpu_checks.py pairs --output pairs.jsonl --count 1000
    python scripts/gpu_checks.py loss outputs/sft_hf_tiny
    python scripts/gpu_checks.py metrics outputs/dpo_hf_tiny margin accuracy kl
    python scripts/gpu_checks.py resume runs/a runs/b runs/c
    python scripts/gpu_checks.py answers answers.jsonl
    python scripts/gpu_checks.py machine
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from dataclasses import replace
from pathlib import Path

# ChatML, as Qwen's tokenizer_config.json writes it: the corpus tokenizer has its two tokens.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


def hf_model(args) -> None:
    """A zoo model's shape with random weights as a Hugging Face folder, with the embedded
    corpus' BPE tokenizer (so its vocabulary) and a ChatML template: a stand-in for a downloaded
    chat model on a machine without network."""
    from tokenizers import Tokenizer

    from llmtrain.data.corpus import CHAT_TOKENS, corpus_tokenizer_path
    from llmtrain.generate.bench import DTYPES, random_hf, zoo_model

    tokenizer = Tokenizer.from_file(str(corpus_tokenizer_path()))
    model = replace(zoo_model(args.overrides),
                    vocab_size=tokenizer.get_vocab_size(with_added_tokens=True))
    start, end = (tokenizer.token_to_id(t) for t in CHAT_TOKENS)
    folder = Path(args.output)
    random_hf(model, folder, DTYPES[args.dtype], bos_token_id=start, eos_token_id=end,
              pad_token_id=None)
    shutil.copy(corpus_tokenizer_path(), folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": CHAT_TOKENS[1], "chat_template": CHATML}))
    print(f"{folder}: {model.name}'s shape with random {args.dtype} weights, the corpus "
          f"tokenizer's vocabulary of {model.vocab_size}")


def pairs(args) -> None:
    """Preference pairs a model can learn within a few steps (the DPO tests' set: a polite
    chosen reply, a curt rejected one)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from rlhf_helpers import separable_pairs

    separable_pairs(Path(args.output), count=args.count)


def _summary(run: str) -> dict:
    return json.loads((Path(run) / "summary.json").read_text())


def loss(args) -> None:
    """First and last loss, and tokens/s over the second half of the steps (past warm-up)."""
    s = _summary(args.run)
    losses = s["losses"]
    step = statistics.median(s["step_seconds"][len(s["step_seconds"]) // 2:])
    speed = s["tokens_per_step"] / step
    line = (f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps, "
            f"{speed:,.0f} tokens/s ({step:.3f} s/step")
    if s.get("peak_tflops"):
        mfu = speed / s["world_size"] * s["flops_per_token"] / 1e12 / s["peak_tflops"]
        line += f", MFU {100 * mfu:.1f}%"
    print(line + ")")


def metrics(args) -> None:
    """First and last value of each named measure of an alignment run; for runs of 10 steps
    or more also the means of the first and the last 5 (rollout measures are noisy)."""
    measures = _summary(args.run)["metrics"]
    print(", ".join(_ends(name, measures[name]) for name in args.names))


def _ends(name: str, values: list[float]) -> str:
    text = f"{name} {values[0]:.4g} -> {values[-1]:.4g}"
    if len(values) >= 10:
        text += f" (5-step means {statistics.fmean(values[:5]):.4g} -> " \
                f"{statistics.fmean(values[-5:]):.4g})"
    return text


def resume(args) -> None:
    """Max |loss difference| over the resumed steps: C (resumed from A's checkpoint) against A,
    and B (another uninterrupted run) against A, the run-to-run noise it is judged against."""
    a, b, c = (_summary(run) for run in (args.a, args.b, args.c))
    start = c["start_step"]
    tail = a["losses"][start:]
    if start == 0 or len(c["losses"]) != len(tail):
        raise SystemExit(f"{args.c} did not resume from a step of {args.a} (start step {start}, "
                         f"{len(c['losses'])} losses)")
    resumed = max(abs(x - y) for x, y in zip(c["losses"], tail))
    noise = max(abs(x - y) for x, y in zip(b["losses"][start:], tail))
    print(f"steps {start + 1}-{a['steps']}: max |loss C - A| {resumed:.3e} (resumed at step "
          f"{start}), max |loss B - A| {noise:.3e} (two uninterrupted runs); "
          f"A's loss {tail[0]:.4f} -> {tail[-1]:.4f}")


def compare(args) -> None:
    """Each named measure of run B beside run A's, step by step, and their largest
    difference."""
    a, b = (_summary(run)["metrics"] for run in (args.a, args.b))
    for name in args.names:
        values = ", ".join(f"{x:.6g}/{y:.6g}" for x, y in zip(a[name], b[name]))
        largest = max(abs(x - y) for x, y in zip(a[name], b[name]))
        print(f"{name} A/B per step: {values}; max |B - A| {largest:.3e}")


def same(args) -> None:
    """Whether two Hugging Face folders hold the same tensors, bitwise (names, formats,
    values)."""
    from safetensors.torch import load_file

    a, b = ({name: t for f in sorted(Path(d).glob("*.safetensors"))
             for name, t in load_file(f).items()} for d in (args.a, args.b))
    differ = sorted(a.keys() ^ b.keys()) + [
        name for name in sorted(a.keys() & b.keys())
        if a[name].dtype != b[name].dtype or not a[name].equal(b[name])]
    print(f"{args.b} against {args.a}: {len(a)} tensors, "
          + (f"{len(differ)} differ: {', '.join(differ[:4])}" if differ else "all identical"))
    if differ:
        raise SystemExit(1)


def answers(args) -> None:
    for line in Path(args.file).read_text().splitlines():
        record = json.loads(line)
        asked = record.get("prompt") or record["messages"][-1]["content"]
        print(f"{asked!r} -> {record['generated_text']!r}")


def machine(args) -> None:
    """The GPUs and the versions that the figures were measured with."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    gpus = torch.cuda.device_count()
    where = f"{gpus} x {torch.cuda.get_device_name()}" if gpus else "no GPU"
    versions = []
    for package in ("torch", "transformer_engine", "megatron-core", "transformers"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} -")
    print(f"{where}; {', '.join(versions)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("hf-model", help=hf_model.__doc__.split(":")[0])
    make.add_argument("overrides", nargs="+", help="model=<name> (conf/model/)")
    make.add_argument("--output", required=True)
    make.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    make.set_defaults(func=hf_model)
    write = commands.add_parser("pairs", help=pairs.__doc__.split(" (")[0])
    write.add_argument("--output", required=True)
    write.add_argument("--count", type=int, default=1000)
    write.set_defaults(func=pairs)
    for name, function in (("loss", loss), ("metrics", metrics)):
        command = commands.add_parser(name, help=function.__doc__)
        command.add_argument("run", help="a run's folder (with summary.json)")
        if name == "metrics":
            command.add_argument("names", nargs="+")
        command.set_defaults(func=function)
    three = commands.add_parser("resume", help=resume.__doc__.split(",")[0])
    for run in ("a", "b", "c"):
        three.add_argument(run)
    three.set_defaults(func=resume)
    pair = commands.add_parser("compare", help=compare.__doc__.split(",")[0])
    pair.add_argument("a")
    pair.add_argument("b")
    pair.add_argument("names", nargs="+")
    pair.set_defaults(func=compare)
    both = commands.add_parser("same", help=same.__doc__.split(" (")[0])
    both.add_argument("a")
    both.add_argument("b")
    both.set_defaults(func=same)
    show = commands.add_parser("answers", help="each prompt and its generated text")
    show.add_argument("file")
    show.set_defaults(func=answers)
    commands.add_parser("machine", help=machine.__doc__).set_defaults(func=machine)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
