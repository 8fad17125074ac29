"""The decode engine's continuous batching, through the interface generate, serve and the
rollouts use (`add`, `advance`, `busy`), on a converted checkpoint in this process: a sequence
that arrives while others generate joins them at once and gets what it gets alone, a seeded
sample is the same whatever it is batched with, and a failed round leaves the engine usable.
On a GPU, the CUDA-graph decode step gives what the eager step gives."""

from __future__ import annotations

import multiprocessing
from functools import partial

import pytest
import torch

from inference_helpers import hf_greedy
from llmtrain.generate import worker
from llmtrain.generate.config import compose, register
from llmtrain.generate.plan import prepare
from llmtrain.generate.sequence import Sampling, Sequence
from llmtrain.launch.local import launch

GREEDY = Sampling(temperature=0)
SAMPLED = Sampling(temperature=1.0, top_k=8, top_p=0.95, seed=21)


def with_engine(mcore, task, *overrides: str):
    """`task(engine)` on the engine `python -m llmtrain.generate load=<mcore> <overrides>`
    loads; its result."""
    c = compose("generate", register, [f"load={mcore}", "input=unused", "output=unused",
                                       *overrides])
    plan = prepare(c)
    return launch(plan.cfg, plan.layout, entry=partial(worker.run, plan, task))


def run_alone(engine, sequence: Sequence) -> list[int]:
    return engine.generate([sequence])[0].tokens


def joins_a_running_batch(engine) -> dict:
    long = Sequence([5, 6, 7, 8], 60, GREEDY, ())
    late = [Sequence([9, 10, 11], 10, GREEDY, ()), Sequence([12, 13], 10, SAMPLED, ())]
    alone = [run_alone(engine, s) for s in [long, *late]]
    got: dict = {}
    engine.add(long, None, lambda out: got.setdefault("long", out.tokens))
    engine.advance()  # the long sequence is generating ...
    for i, s in enumerate(late):  # ... when two more arrive
        engine.add(s, None, lambda out, i=i: got.setdefault(i, out.tokens))
    rounds_until_late_done = 0
    while 0 not in got or 1 not in got:
        engine.advance()
        rounds_until_late_done += 1
    long_still_running = "long" not in got
    while engine.busy:
        engine.advance()
    return {"alone": alone, "together": [got["long"], got[0], got[1]],
            "long_still_running": long_still_running,
            "rounds": rounds_until_late_done, "engine": engine.description}


def test_a_late_sequence_joins_the_running_batch_and_gets_its_own_answer(tiny_llama):
    hf, mcore = tiny_llama
    result = with_engine(mcore, joins_a_running_batch, "inference_max_batch_size=4")
    assert result["engine"].startswith("decode engine"), result["engine"]
    # The late ones finished within a couple of rounds, while the long one still generated.
    assert result["long_still_running"] and result["rounds"] <= 3, result
    assert result["together"] == result["alone"]
    reference = hf_greedy(hf, [5, 6, 7, 8], 60)  # up to its first end token
    assert result["alone"][0][:len(reference)] == reference


def seeded_companions(engine) -> dict:
    """One seeded sample alone, then beside others of other seeds and parameters."""
    mine = Sequence([20, 21, 22], 16, SAMPLED, ())
    others = [Sequence([30 + i, 31], 16, Sampling(temperature=0.7, top_p=0.8, seed=i), ())
              for i in range(3)] + [Sequence([40, 41, 42, 43], 16, GREEDY, ())]
    alone = run_alone(engine, mine)
    mixed = engine.generate([others[0], mine, *others[1:]])
    return {"alone": alone, "beside": mixed[1].tokens,
            "others": [o.tokens for o in mixed[:1] + mixed[2:4]]}


def test_a_seeded_sample_does_not_depend_on_its_batch(tiny_llama):
    _, mcore = tiny_llama
    result = with_engine(mcore, seeded_companions, "inference_max_batch_size=8")
    assert result["beside"] == result["alone"]
    # Other seeds draw other streams.
    assert all(tokens != result["alone"] for tokens in result["others"])


def recovers_after_a_failed_round(engine) -> dict:
    engine.add(Sequence([5, 6, 7], 8, GREEDY, ()), lambda *_: 1 / 0, None)
    try:
        engine.advance()
        failed = None
    except ZeroDivisionError as error:
        failed = type(error).__name__
    engine.abort()
    busy = engine.busy
    return {"failed": failed, "busy": busy,
            "after": run_alone(engine, Sequence([5, 6, 7], 8, GREEDY, ()))}


def test_an_aborted_round_leaves_the_engine_usable(tiny_llama):
    hf, mcore = tiny_llama
    result = with_engine(mcore, recovers_after_a_failed_round)
    assert result["failed"] == "ZeroDivisionError" and not result["busy"]
    reference = hf_greedy(hf, [5, 6, 7], 8)
    assert result["after"][:len(reference)] == reference


def stopped_by_its_client(engine) -> dict:
    """A client ends a sequence after three tokens; the next one takes its row."""
    made = []
    ended = engine.generate([Sequence([5, 6, 7, 8], 20, GREEDY, ())],
                            on_token=lambda i, t, lp, top: made.append(t) or len(made) == 3)
    return {"ended": ended[0].tokens, "next": run_alone(engine, Sequence([9, 10, 11], 10,
                                                                          GREEDY, ()))}


def a_tensor_parallel_session(engine) -> dict:
    return {"joins": joins_a_running_batch(engine), "stopped": stopped_by_its_client(engine),
            "recovers": recovers_after_a_failed_round(engine)}


def test_tensor_parallel_ranks_decode_in_lockstep(tiny_llama):
    """At TP 2 both ranks run the decode engine, each its shard: late arrivals, a sequence its
    client stops, and a failed round reach the follower, whose shard the driver's answers need
    (out of step, they would differ from transformers')."""
    hf, mcore = tiny_llama
    result = with_engine(mcore, a_tensor_parallel_session, "tensor_model_parallel_size=2",
                         "inference_max_batch_size=4")
    joins = result["joins"]
    assert joins["engine"].startswith("decode engine"), joins["engine"]
    assert joins["together"] == joins["alone"] and joins["long_still_running"]
    reference = hf_greedy(hf, [5, 6, 7, 8], 60)
    assert joins["alone"][0][:len(reference)] == reference
    assert result["stopped"]["ended"] == reference[:3]
    reference = hf_greedy(hf, [9, 10, 11], 10)
    assert result["stopped"]["next"][:len(reference)] == reference
    recovers = result["recovers"]
    assert recovers["failed"] == "ZeroDivisionError" and not recovers["busy"]
    reference = hf_greedy(hf, [5, 6, 7], 8)
    assert recovers["after"][:len(reference)] == reference


def graphs_and_eager(engine) -> dict:
    from llmtrain.megatron.decode_engine import DecodeEngine

    eager = DecodeEngine(engine.model, engine.vocab_size, engine.max_batch_size,
                         engine.max_sequence_length, "cuda", graphs=False)
    penalized = Sampling(temperature=0.9, seed=5, repetition_penalty=1.2)
    batch = [Sequence([5 + i, 6, 7], 24, s, ()) for i, s in
             enumerate([GREEDY, SAMPLED, penalized])]
    return {"graphs": [o.tokens for o in engine.generate(batch)],
            "eager": [o.tokens for o in eager.generate(batch)]}


def graphs_and_eager_of(mcore: str) -> dict:
    return with_engine(mcore, graphs_and_eager, "dtype=fp32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_decode_equals_eager_decode(tiny_llama):
    """In a process of its own: this one converted the checkpoint, and the CPU stand-ins a
    conversion installs (llmtrain.megatron.cpu) must not reach GPU work."""
    _, mcore = tiny_llama
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(graphs_and_eager_of, (str(mcore),))
    assert result["graphs"] == result["eager"]
    assert len({tuple(tokens) for tokens in result["graphs"]}) == 3
