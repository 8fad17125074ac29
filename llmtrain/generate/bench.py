"""`python -m llmtrain.generate.bench`: generation tokens/s of llmtrain's engine beside
`transformers.generate`, on the same model and the same prompts, in one run.

The model is a Hugging Face folder (--hf) or a model of the zoo with random weights (model=<name>,
saved as a Hugging Face folder first); it is converted to a Megatron-Core checkpoint, then each
batch size runs on transformers (greedy `generate`, SDPA attention, its KV cache) and on
llmtrain's engine (the decode engine where it covers the model, else Megatron-Core's; --engine),
both generating exactly --new-tokens tokens per sequence after --prompt-length random prompt
tokens. Figures are medians over --repeats timed runs after one warm-up, printed with the
weight-bandwidth bound of batch 1 (the model's bytes over a device copy's bandwidth, measured in
the same run). Not a test: nothing here asserts a speed.

    python -m llmtrain.generate.bench model=llama3_2_1b --batch-sizes 1,32
    python -m llmtrain.generate.bench --hf /models/Llama-3.2-1B --batch-sizes 1,32
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from llmtrain.generate.sequence import Sampling, Sequence

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def zoo_model(overrides: list[str]):
    """The ModelConfig of `model=<name>` (conf/model/)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException
    from omegaconf import OmegaConf

    from llmtrain.cli import CONF_DIR
    from llmtrain.config.store import register as register_training
    from llmtrain.generate.config import register

    register()
    register_training()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        try:
            dcfg = compose("generate", overrides=overrides)
        except MissingConfigException as exc:
            missing = str(exc).splitlines()[0].split(": ", 1)[-1]  # Could not find 'model/x'
            raise SystemExit(f"llmtrain: {missing}; the models of conf/model/: "
                             f"{', '.join(exc.options or [])}") from None
    if dcfg.model is None:
        raise SystemExit("name the model: model=<name> (conf/model/) or --hf <folder>")
    return OmegaConf.to_object(dcfg.model)


def random_hf(model, folder: Path, dtype: torch.dtype, **hf_fields) -> Path:
    """A Hugging Face folder of the zoo model with random weights; `hf_fields` are set on the
    Hugging Face config (token ids, say)."""
    from transformers import AutoModelForCausalLM

    from llmtrain.convert import families

    config = families.by_name(model.family).hf_config(model)
    for key, value in hf_fields.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(str(folder))
    return folder


def converted(hf: Path, mcore: Path, dtype: str) -> Path:
    """The Megatron-Core checkpoint of a Hugging Face folder. In a process of its own: a
    conversion runs on the CPU, and the CPU stand-ins it installs (llmtrain.megatron.cpu) must
    not reach this process's GPU work."""
    subprocess.run([sys.executable, "-m", "llmtrain.convert", f"input={hf}", f"output={mcore}",
                    "check=false", f"dtype={dtype}"], check=True, stdout=subprocess.DEVNULL)
    return mcore


def word_tokenizer(folder: Path, vocab_size: int) -> Path:
    """A tokenizer of `vocab_size` words ("<|endoftext|>" and "w1" ...) beside a random model,
    for the tools that need one (a server)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # words joined by spaces
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(run, repeats: int, device: str) -> list[float]:
    run()  # warm-up
    seconds = []
    for _ in range(repeats):
        _sync(device)
        began = time.perf_counter()
        run()
        _sync(device)
        seconds.append(time.perf_counter() - began)
    return seconds


def transformers_peer(folder: Path, prompts: list[list[int]], args, device: str) -> dict:
    """{batch size: (seconds, tokens of the first sequence)} of transformers.generate."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[args.dtype],
                                                 attn_implementation="sdpa").to(device).eval()
    results = {}
    for size in args.batch_sizes:
        ids = torch.tensor(prompts[:size], device=device)
        outputs = []

        @torch.inference_mode()
        def run():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, pad_token_id=0)
            outputs.append(out[0, ids.size(1):].tolist())

        results[size] = (_time(run, args.repeats, device), outputs[-1])
    return results


def copy_bandwidth(device: torch.device, size: int = 1 << 30) -> float:
    """Bytes per second a device-to-device copy moves (each byte read and written once): what
    reading the weights once per token can reach at best."""
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = statistics.median(_time(lambda: dst.copy_(src), 5, device.type))
    return 2 * size / seconds


def engine_peer(prompts: list[list[int]], args, engine) -> dict:
    """Driver: the same on llmtrain's engine; and the weight-bandwidth bound of batch 1 (the
    model's bytes read once per token at the measured copy bandwidth)."""
    results = {}
    for size in args.batch_sizes:
        batch = [Sequence(p, args.new_tokens, Sampling(temperature=0.0)) for p in prompts[:size]]
        outputs = []
        results[size] = (_time(lambda: outputs.append(engine.generate(batch)[0].tokens),
                               args.repeats, engine.device.type), outputs[-1])
    model = engine.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(engine.device)
    return {"results": results, "engine": engine.description, "weight_bytes": weights,
            "bandwidth": bandwidth}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", help="a Hugging Face model folder (else model=<name>: random "
                                     "weights of a zoo model)")
    parser.add_argument("--batch-sizes", default="1,32",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--engine", choices=["auto", "megatron"], default="auto",
                        help="auto: the decode engine where it covers the model")
    parser.add_argument("overrides", nargs="*", help="model=<name> (conf/model/)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")

    from llmtrain.generate import worker
    from llmtrain.generate.config import InferenceConfig
    from llmtrain.generate.plan import prepare
    from llmtrain.launch.local import launch

    with tempfile.TemporaryDirectory(prefix="llmtrain-bench-") as scratch:
        if args.hf:
            hf = Path(args.hf)
        else:
            model = zoo_model(args.overrides)
            hf = random_hf(model, Path(scratch) / model.name, DTYPES[args.dtype])
        mcore = converted(hf, Path(scratch) / "mcore", args.dtype)
        plan = prepare(InferenceConfig(
            load=str(mcore), dtype=args.dtype, inference_max_batch_size=max(args.batch_sizes),
            inference_max_seq_length=args.prompt_length + args.new_tokens, seed=args.seed,
            engine=args.engine),
            needs_tokenizer=False)
        generator = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(0, plan.model.vocab_size,
                                (max(args.batch_sizes), args.prompt_length),
                                generator=generator).tolist()
        hf_results = transformers_peer(hf, prompts, args, device)
        if device == "cuda":
            torch.cuda.empty_cache()  # transformers' model is gone: its memory goes back
        ours = launch(plan.cfg, plan.layout, entry=partial(
            worker.run, plan, partial(engine_peer, prompts, args)))
    name = plan.model.name
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    bound = ours["bandwidth"] / ours["weight_bytes"]
    print(f"\n{name}, {args.dtype}, prompts of {args.prompt_length} tokens, "
          f"{args.new_tokens} new tokens each (greedy), {where}; {ours['engine']}; median of "
          f"{args.repeats} runs after a warm-up", file=sys.stderr)
    print(f"{'batch':>6}{'llmtrain tokens/s':>20}{'transformers tokens/s':>24}{'ratio':>8}"
          f"{'same greedy prefix':>21}")
    for size in args.batch_sizes:
        mine, theirs = ours["results"][size], hf_results[size]
        speed = size * args.new_tokens / statistics.median(mine[0])
        peer = size * args.new_tokens / statistics.median(theirs[0])
        # Greedy tokens agree up to the first that differs (after it, the contexts differ).
        same = next((i for i, (a, b) in enumerate(zip(mine[1], theirs[1])) if a != b),
                    args.new_tokens) / args.new_tokens
        print(f"{size:>6}{speed:>20,.1f}{peer:>24,.1f}{speed / peer:>7.2f}x{same:>20.0%}")
        if size == 1:
            at_one = speed
    print(f"weight-bandwidth bound of batch 1: {ours['weight_bytes'] / 1e9:.2f} GB of weights "
          f"at {ours['bandwidth'] / 1e9:,.0f} GB/s (a device copy, measured) = {bound:,.0f} "
          f"tokens/s" + (f"; llmtrain at batch 1 reaches {at_one / bound:.0%} of it"
                         if 1 in args.batch_sizes else ""))

if __name__ == "__main__":
    main()
