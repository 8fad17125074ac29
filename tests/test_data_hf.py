"""Datasets in the Hugging Face formats (written here by the real `datasets` package): a
save_to_disk folder, a DatasetDict, and a folder of parquet shards read like the same rows as
JSON lines, for pretraining (tokenize), SFT and preference data, with the same bad-input
messages."""

from __future__ import annotations

import pytest

from conftest import compose_config, run_llmtrain
from data_helpers import as_sharegpt, conversations, documents, train_bpe, write_jsonl
from llmtrain.config.layout import Machine
from llmtrain.config.validate import validate
from llmtrain.data.sources import DataError, chunks

datasets = pytest.importorskip("datasets")


def test_tokenize_reads_a_save_to_disk_folder_as_its_jsonl(tmp_path):
    rows = [{"id": i, "text": text} for i, text in enumerate(documents(40))]
    write_jsonl(tmp_path / "docs.jsonl", rows)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "docs_hf"))
    for name in ("docs.jsonl", "docs_hf"):
        out = run_llmtrain("tokenize", "--input", str(tmp_path / name), "--output-prefix",
                           str(tmp_path / name.replace(".", "_")), "--json-keys", "text",
                           "--append-eod", "--workers", "1", module="llmtrain.data").stdout
        assert "40 documents" in out, out
    for suffix in (".bin", ".idx"):
        written = [(tmp_path / f"{name}_text_document{suffix}").read_bytes()
                   for name in ("docs_jsonl", "docs_hf")]
        assert written[0] == written[1]

    with pytest.raises(DataError) as error:  # what `tokenize --json-keys content` reports
        list(chunks([tmp_path / "docs_hf"], columns=["content"]))
    assert str(error.value) == (f"{tmp_path / 'docs_hf'}: no column 'content'; the columns "
                                f"present are: id, text")


def test_sft_from_a_dataset_dict_matches_its_jsonl(tmp_path):
    from llmtrain.data.tokenizer import load_tokenizer
    from llmtrain.megatron.data import build_datasets

    train_bpe(tmp_path / "tok")
    rows = [as_sharegpt(c) for c in conversations()]
    write_jsonl(tmp_path / "chat.jsonl", rows)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "chat_hf"))
    batches = []
    for source in ("chat.jsonl", "chat_hf"):
        cfg = compose_config(
            "data=sft", f"data.data_path=[{tmp_path / source}]", "data.split='100,0,0'",
            "data.tokenizer.tokenizer_type=huggingface",
            f"data.tokenizer.tokenizer_model={tmp_path / 'tok' / 'tokenizer.json'}",
            "data.seq_length=64", "stage.micro_batch_size=1", "stage.global_batch_size=1",
            "stage.train_iters=3", "stage.eval_interval=0", "optim.lr_warmup_iters=0",
            output_dir=str(tmp_path))
        train, _ = build_datasets(cfg, validate(cfg, Machine()),
                                  load_tokenizer(cfg.data.tokenizer), str(tmp_path / "cache"))
        batches.append([train[i]["tokens"].tolist() for i in range(3)])
    assert batches[0] == batches[1]


def test_preference_pairs_from_parquet_shards_and_bad_folders(tmp_path):
    from llmtrain.rlhf.records import read

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    (tmp_path / "pairs").mkdir()
    datasets.Dataset.from_list(rows[:3]).to_parquet(str(tmp_path / "pairs" / "part-0.parquet"))
    datasets.Dataset.from_list(rows[3:]).to_parquet(str(tmp_path / "pairs" / "part-1.parquet"))
    from_jsonl = [record for _, record in read([str(tmp_path / "pairs.jsonl")])]
    from_shards = list(read([str(tmp_path / "pairs")]))
    assert [record for _, record in from_shards] == from_jsonl
    assert from_shards[4][0] == f"{tmp_path / 'pairs'} row 5"

    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: a folder, but not a dataset: give a file, or a "
                                        "folder written by datasets.save_to_disk"):
        list(read([str(tmp_path / "empty")]))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(
        str(tmp_path / "test_only"))
    with pytest.raises(DataError, match=r"test_only: a DatasetDict without a 'train' split "
                                        r"\(its splits: test\)"):
        list(read([str(tmp_path / "test_only")]))


def test_a_dataset_in_the_local_hub_cache_is_read_by_its_hub_name(tmp_path, monkeypatch):
    """data.data_path=[hf://datasets/<org>/<name>] is the snapshot that `huggingface-cli
    download --repo-type dataset` leaves in the cache (laid out here as it does): the rows of
    its train shards, not of its test ones. One not in the cache is refused with the command
    that puts it there; nothing is downloaded."""
    import huggingface_hub.constants

    from llmtrain.cli import resolve_run
    from llmtrain.config.validate import ConfigError
    from llmtrain.rlhf.records import read

    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    repo, revision = tmp_path / "hub" / "datasets--org--pairs", "0123456789" * 4
    shards = repo / "snapshots" / revision / "data"
    shards.mkdir(parents=True)
    datasets.Dataset.from_list(rows[:4]).to_parquet(str(shards / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[4:]).to_parquet(str(shards / "test-00000-of-00001.parquet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    def resolved(entry: str):
        return resolve_run(compose_config("stage=dpo", "data=preference",
                                          f"data.data_path=[{entry}]", typed=False))

    cfg = resolved("hf://datasets/org/pairs")
    assert cfg.data.data_path == [str(shards.parent)]
    assert [record for _, record in read(cfg.data.data_path)] == rows[:4]
    with pytest.raises(ConfigError) as error:
        resolved("hf://datasets/org/absent")
    assert str(error.value).endswith(
        "data.data_path entry hf://datasets/org/absent: the dataset is not in the local Hugging "
        "Face cache; download it first: huggingface-cli download --repo-type dataset org/absent")
