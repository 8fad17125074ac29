"""stage=kto: unpaired desirable and undesirable completions (TRL's unpaired preference format)
against a frozen reference and KTO's reference point, the KL estimated on the step's prompts
joined with other examples' completions. The loss on a hand-computed batch, the mismatched rows
the reference point is estimated on, the data of the wrong kind refused with what to do, and a
short run in which the desirable completions rise above the reference and the undesirable ones
fall below it."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import compose_config, run_llmtrain, summary
from llmtrain.config import inputs
from llmtrain.config.layout import Machine
from llmtrain.config.schema import AlignmentConfig, TokenizerConfig
from llmtrain.config.validate import ConfigError, validate
from llmtrain.data import chat
from llmtrain.data.sources import DataError
from llmtrain.data.tokenizer import load_tokenizer
from llmtrain.rlhf import losses
from llmtrain.rlhf.records import encode_unpaired, read
from llmtrain.rlhf.unpaired import UnpairedDataset
from rlhf_helpers import TINY, separable_pairs, separable_unpaired


def test_kto_loss_on_a_hand_computed_batch():
    a = AlignmentConfig(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    # Log-ratios of policy to reference on the mismatched rows: 0.4, 0.2, 0, 0.2 -> z0 = 0.2.
    mismatched = torch.tensor([-5.0, -6.0, -4.0, -7.0]) - torch.tensor([-5.4, -6.2, -4.0, -7.2])
    mismatched.requires_grad_(True)
    point = losses.kto_reference_point(mismatched.sum(), 4)
    assert point.item() == pytest.approx(0.2) and not point.requires_grad  # detached
    assert losses.kto_reference_point(-mismatched.sum(), 4).item() == 0.0  # never below 0

    policy = torch.tensor([-2.0, -3.0, -1.0, -4.0], requires_grad=True)
    reference = torch.tensor([-2.5, -2.0, -1.0, -3.0])  # log-ratios 0.5, -1, 0, -1
    desirable = torch.tensor([True, True, False, False])
    loss = losses.kto(policy, reference, desirable, point, a)
    # 1 - sigmoid(0.5 (0.5 - 0.2)), 1 - sigmoid(0.5 (-1 - 0.2)) for the desirable ones;
    # 1.5 (1 - sigmoid(0.5 (0.2 - 0))), 1.5 (1 - sigmoid(0.5 (0.2 + 1))) for the others.
    assert loss.tolist() == pytest.approx([0.4625702, 0.6456563, 0.7125312, 0.5315155], abs=1e-6)
    loss.sum().backward()
    assert (policy.grad[:2] < 0).all() and (policy.grad[2:] > 0).all()  # up, and down


@pytest.fixture(scope="module")
def corpus_chat():
    tokenizer = load_tokenizer(TokenizerConfig(tokenizer_type="corpus"))
    return tokenizer, chat.load_template("chatml", tokenizer)


def test_each_prompt_is_paired_with_another_completion_of_its_step(corpus_chat, tmp_path):
    tokenizer, template = corpus_chat
    path = separable_unpaired(tmp_path / "kto.jsonl", count=12)
    examples = [encode_unpaired(r, w, template, tokenizer, None) for w, r in read([str(path)])]
    dataset = UnpairedDataset(examples, seq_length=40, num_samples=24, global_batch_size=4,
                              seed=0, pad_id=tokenizer.eod, attention_mask=False)
    for index in range(24):
        item, own = dataset[index], examples[dataset.pair_index(index)]
        other = examples[dataset.mismatched(index)]
        step = range(index - index % 4, index - index % 4 + 4)
        assert dataset.mismatched(index) in [dataset.pair_index(i) for i in step if i != index]
        assert other.prompt != own.prompt
        tokens = item["tokens"][1, :len(own.prompt) + len(other.completion) - 1].tolist()
        assert tokens == (own.prompt + other.completion)[:-1]  # its prompt, their completion
        assert item["desirable"] == own.desirable
        trained = [int(t) for t, m in zip(item["labels"][0], item["loss_mask"][0]) if m]
        assert trained == [i for i, m in zip(own.completion, own.mask) if m]


def test_kto_settings_are_checked_before_launch():
    cfg = compose_config("stage=kto", "data=unpaired", "stage.alignment.undesirable_weight=0",
                         "stage.global_batch_size=1", "stage.micro_batch_size=1",
                         "stage.alignment.loss_type=ipo",
                         "stage.alignment.reference_logprobs=precomputed")
    with pytest.raises(ConfigError) as error:
        validate(cfg, Machine(gpus=0, has_transformer_engine=False))
    assert sorted(error.value.problems) == [
        "stage.alignment.loss_type=ipo chooses stage=dpo's loss; stage=kto has its own: unset it",
        "stage.alignment.reference_logprobs=precomputed: stage=kto computes the reference's "
        "log-probabilities every step (its reference point pairs each prompt with another "
        "example's completion of the step): set it to on_the_fly",
        "stage.alignment.undesirable_weight=0.0 must be above 0",
        "stage=kto pairs each prompt with another example's completion of the step (its "
        "reference point): stage.global_batch_size must be at least 2"]


def _refused(*args: str) -> str:
    process = run_llmtrain(*args, check=False, timeout=300)
    assert process.returncode == 2, process.stdout[-2000:] + process.stderr[-4000:]
    assert "training tiny" not in process.stdout
    return process.stderr


def test_kto_and_the_preference_stages_refuse_each_others_data(tmp_path, corpus_chat):
    pairs = separable_pairs(tmp_path / "pairs.jsonl", count=4)
    unpaired = separable_unpaired(tmp_path / "kto.jsonl", count=4)
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello"}]}) + "\n")
    error = _refused("stage=kto", "data=unpaired", f"data.data_path=[{pairs}]")
    assert (f"{pairs} line 1: a paired preference record (prompt, chosen, rejected), but "
            f"data=unpaired (stage=kto) reads {{prompt, completion, label}} records: train on "
            f"pairs with stage=dpo data=preference, or write each pair as two records") in error
    cfg = compose_config("stage=dpo", "data=preference", f"data.data_path=[{unpaired}]")
    assert inputs.record_problems(cfg) == [
        f"{unpaired} line 1: an unpaired record (prompt, completion, label), as KTO reads, but "
        f"data=preference (stage=rm or dpo) reads {{prompt, chosen, rejected}} records: train on "
        f"unpaired completions with stage=kto data=unpaired, or pair a desirable and an "
        f"undesirable completion of each prompt as {{prompt, chosen, rejected}}"]
    cfg = compose_config("stage=kto", "data=unpaired", f"data.data_path=[{sft}]")
    assert inputs.record_problems(cfg) == [
        f"{sft} line 1: an SFT conversation, but data=unpaired (stage=kto) reads {{prompt, "
        f"completion, label}} records: train on conversations with stage=sft data=sft, or "
        f"write each reply as {{prompt, completion, label}} with label true (desirable) or false"]
    # A file that turns to pairs (or a bad label) further down: the loader names the line.
    tokenizer, template = corpus_chat
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(unpaired.read_text() + pairs.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match=r"mixed.jsonl line 5: a paired preference record"):
        for where, record in read([str(mixed)]):
            encode_unpaired(record, where, template, tokenizer, None)
    with pytest.raises(DataError, match=r"r1: 'label' must be true \(a desirable completion\) or "
                                        r"false \(an undesirable one\), not 'yes'"):
        encode_unpaired({"prompt": "q", "completion": "a", "label": "yes"}, "r1", template,
                        tokenizer, None)


def test_kto_raises_desirable_completions_above_the_reference_and_lowers_undesirable_ones(
        tmp_path):
    data = separable_unpaired(tmp_path / "kto.jsonl", count=64)
    run = tmp_path / "kto"
    out = run_llmtrain("stage=kto", "data=unpaired", f"data.data_path=[{data}]", *TINY,
                       "model.num_layers=2",
                       "optim.lr=5e-5", "optim.min_lr=5e-5", "stage.micro_batch_size=4",
                       "stage.global_batch_size=8", "stage.train_iters=6",
                       f"hydra.run.dir={run}", "checkpoint.save=null").stdout
    assert "63 for training (31 desirable, 32 undesirable)" in out
    assert "= 0.97 (the KTO paper advises 1 to 4/3)" in out
    result = summary(run)
    m = result["metrics"]
    good, bad = m["reward_desirable"], m["reward_undesirable"]
    assert good[0] == bad[0] == m["kl"][0] == 0.0  # the policy starts as its reference
    assert result["losses"][0] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0)
    assert all(b > a for a, b in zip(good, good[1:])) and good[-1] > 0.5, good
    assert all(b < a for a, b in zip(bad, bad[1:])), bad
    gap = [d - u for d, u in zip(m["logp_desirable"], m["logp_undesirable"])]
    assert gap[-1] > gap[0] + 5.0, gap  # nats: desirable completions rose against the others
    assert result["losses"][-1] < result["losses"][0]
