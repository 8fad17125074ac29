"""Offline generation: read and encode the prompts, run them in batches on the model's processes,
decode and write the generations."""

from __future__ import annotations

import sys
import time
from functools import partial

from llmtrain.generate import prompts, worker
from llmtrain.generate.config import GenerateConfig, SamplingConfig
from llmtrain.generate.plan import InferenceError, Plan, prepare
from llmtrain.generate.sequence import Sampling, Sequence, run_all, sampling_problems
from llmtrain.generate.text import Text


def sampling(s: SamplingConfig, seed=None) -> Sampling:
    if s.greedy:
        return Sampling(temperature=0.0, repetition_penalty=s.repetition_penalty)
    return Sampling(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                    repetition_penalty=s.repetition_penalty, seed=seed)


def _sequences(c: GenerateConfig, plan: Plan, text: Text, ids: list[list[int]]
               ) -> tuple[list[Sequence], int]:
    """One sequence per prompt (prompts too long keep their last tokens); the number cut."""
    new = c.sampling.num_tokens_to_generate
    room = plan.max_sequence_length - new
    problems = sampling_problems(sampling(c.sampling), plan.model.vocab_size)
    if new < 0:
        problems.append(f"sampling.num_tokens_to_generate={new} must be at least 0")
    elif room < 1:
        problems.append(f"sampling.num_tokens_to_generate={new} leaves no room for a prompt in "
                        f"inference_max_seq_length={plan.max_sequence_length}")
    if c.max_prompt_length is not None and c.max_prompt_length < 1:
        problems.append(f"max_prompt_length={c.max_prompt_length} must be at least 1")
    if problems:
        raise InferenceError("the configuration has problem(s):\n  - " + "\n  - ".join(problems))
    limit = min(room, c.max_prompt_length or room)
    stops = () if c.sampling.ignore_eos else text.stop_ids
    mode = sampling(c.sampling)
    return ([Sequence(p[-limit:], new, mode, stops) for p in ids],
            sum(len(p) > limit for p in ids))


def generate_all(sequences: list[Sequence], engine) -> dict:
    """Driver: every sequence through the engine, shortest prompts first; outputs in input
    order, and a progress line every 2 s."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].prompt))
    began = last = time.perf_counter()

    def progress(outputs: list) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last > 2 or not engine.busy:
            last = now
            done = [o for o in outputs if o is not None]
            made = sum(len(o.tokens) for o in done)
            print(f"[generate] {len(done)}/{len(sequences)} prompts, {made} tokens, "
                  f"{made / (now - began):.1f} tokens/s", file=sys.stderr, flush=True)

    outputs: list = [None] * len(sequences)
    for i, output in zip(order, run_all(engine, [sequences[i] for i in order], progress)):
        outputs[i] = output
    return {"outputs": outputs, "seconds": time.perf_counter() - began,
            "tokens": sum(len(o.tokens) for o in outputs), "engine": engine.description}


def execute(c: GenerateConfig, say=print) -> dict:
    """Run a generation job; return its summary."""
    from llmtrain.launch.local import launch

    plan = prepare(c)
    text = Text.load(plan)
    records = prompts.read(c.input, c.input_format)
    sequences, cut = _sequences(c, plan, text, prompts.encode(records, text, c.input))
    say(f"[generate] {len(sequences)} prompts from {c.input}"
        + (f" ({cut} cut to their last tokens)" if cut else ""))
    result = launch(plan.cfg, plan.layout, entry=partial(
        worker.run, plan, partial(generate_all, sequences)))
    out = []
    for record, seq, output in zip(records, sequences, result["outputs"]):
        out.append({**record, "generated_text": text.decode(output.visible(seq.stop_ids)),
                    "generated_tokens": output.tokens, "finish_reason": output.finish_reason,
                    "num_prompt_tokens": len(seq.prompt)})
    prompts.write(c.output, out)
    summary = {"prompts": len(out), "tokens": result["tokens"],
               "seconds": round(result["seconds"], 2),
               "tokens_per_second": round(result["tokens"] / max(result["seconds"], 1e-9), 1),
               "engine": result["engine"], "output": c.output}
    say(f"[generate] wrote {len(out)} generations ({summary['tokens']} tokens, "
        f"{summary['tokens_per_second']} tokens/s) to {c.output}")
    return summary
