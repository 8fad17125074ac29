"""Pretraining data through Megatron-Core's builder: blends honour their weights, and data that
cannot work is refused with a message instead of a hang or a crash deep in the model."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import compose_config
from llmtrain.config.layout import Machine
from llmtrain.config.validate import validate
from llmtrain.data.indexed import IndexedDatasetWriter
from llmtrain.data.sources import DataError
from llmtrain.data.tokenizer import load_tokenizer


def write_dataset(prefix, token: int, documents: int, length: int = 100) -> str:
    """A dataset whose every token is `token`, so that samples tell where they came from."""
    with IndexedDatasetWriter(prefix, 4096) as writer:
        for _ in range(documents):
            writer.add_document([token] * length)
    return str(prefix)


def build(tmp_path, data_path: list, *overrides):
    from llmtrain.megatron.data import build_datasets

    cfg = compose_config("data=indexed", f"data.data_path=[{','.join(map(str, data_path))}]",
                         "data.tokenizer.tokenizer_type='null'", "data.seq_length=32",
                         "stage.global_batch_size=8", "stage.micro_batch_size=8",
                         "stage.train_iters=100", "stage.eval_interval=0",
                         "optim.lr_warmup_iters=0", *overrides, output_dir=str(tmp_path))
    layout = validate(cfg, Machine())
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.model.vocab_size)
    return build_datasets(cfg, layout, tokenizer, str(tmp_path / "cache"))


def test_blend_honours_its_weights(tmp_path):
    a = write_dataset(tmp_path / "a_text_document", 11, 200)
    b = write_dataset(tmp_path / "b_text_document", 22, 200)
    train, _ = build(tmp_path, [0.75, a, 0.25, b])
    assert len(train) == 800
    sources = [int(train[i]["tokens"][0]) for i in range(len(train))]
    assert set(sources) == {11, 22}
    assert sources.count(11) / len(sources) == pytest.approx(0.75, abs=0.01)
    # The other way round, from the same files.
    train, _ = build(tmp_path, [1, a, 3, b])
    share = np.mean([int(train[i]["tokens"][0]) == 11 for i in range(len(train))])
    assert share == pytest.approx(0.25, abs=0.01)


def test_split_with_no_documents_is_named(tmp_path):
    small = write_dataset(tmp_path / "small_text_document", 5, 3)
    with pytest.raises(DataError) as error:
        build(tmp_path, [small], "stage.eval_interval=50")
    assert str(error.value) == (
        f"the valid split of {small} has no documents: data.split=969,30,1 gives it 3.0% of 3 "
        f"document(s), which rounds to none: add data or raise its share of data.split or set "
        f"stage.eval_interval=0")


def test_token_ids_beyond_the_model_vocabulary_are_refused(tmp_path):
    prefix = tmp_path / "big_text_document"
    with IndexedDatasetWriter(prefix, 50000) as writer:
        writer.add_document(list(range(4090, 4110)) * 5)
    with pytest.raises(DataError) as error:
        build(tmp_path, [prefix])
    assert str(error.value) == (
        f"{prefix} holds token id 4109: it needs a vocabulary of at least 4110 tokens, but model "
        f"tiny has vocab_size 4096; tokenize the data with the model's tokenizer, or choose a "
        f"model with a larger vocabulary")


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(DataError) as error:
        build(tmp_path, [tmp_path / "nope_text_document"])
    assert str(error.value) == (
        f"no indexed dataset at {tmp_path / 'nope_text_document'} (expected "
        f"{tmp_path / 'nope_text_document'}.bin and {tmp_path / 'nope_text_document'}.idx): "
        f"data.data_path lists prefixes written by `python -m llmtrain.data tokenize` (without "
        f".bin/.idx)")
