"""The migration pages (ms-swift, Megatron-LM, Pai-Megatron-Patch): their tables are
llmtrain/config/aliases.py, every override in them composes for the command it belongs to, and
ms-swift's names typed on the command line give the same config as llmtrain's."""

from __future__ import annotations

import shlex
from dataclasses import fields

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import ROOT, run_llmtrain
from llmtrain.cli import CONF_DIR
from llmtrain.config import aliases
from llmtrain.config.aliases import AliasError, Row, rewrite
from llmtrain.config.schema import Config

DOCS = ROOT / "docs"
ALL_ROWS = [*aliases.MS_SWIFT, *aliases.MEGATRON_LM,
            *(row for rows in aliases.PAI_MEGATRON_PATCH.values() for row in rows)]
CONFIG_NAMES = {"llmtrain": "config", "llmtrain.convert": "convert",
                "llmtrain.generate": "generate"}


def test_the_pages_show_the_tables_of_the_module():
    assert aliases.markdown(aliases.MS_SWIFT, "ms-swift") in \
        (DOCS / "migrate_ms_swift.md").read_text()
    assert aliases.markdown(aliases.MEGATRON_LM, "Megatron-LM") in \
        (DOCS / "migrate_megatron_lm.md").read_text()
    pai = (DOCS / "migrate_pai_megatron_patch.md").read_text()
    for script, rows in aliases.PAI_MEGATRON_PATCH.items():
        assert aliases.markdown(rows, "argument") in pai, script
        # Every positional argument of the script, in order.
        assert [int(r.source.split()[0][1:]) for r in rows] == list(range(1, len(rows) + 1))


def _register_every_schema():
    from llmtrain.config.store import register as training
    from llmtrain.convert.config import register as convert
    from llmtrain.generate.config import register as generate

    for register in (training, convert, generate):
        register()


def _mismatches(row: Row, parser: OverridesParser) -> list[str]:
    """What the row's overrides fail to set (composing raises when they do not compose)."""
    overrides = shlex.split(row.override)
    cfg = compose(CONFIG_NAMES[row.command], overrides=overrides, return_hydra_config=True)
    wrong = []
    for override in map(parser.parse_override, overrides):
        if "." in override.key_or_group:
            value = override.value()
            value = [str(v) for v in value] if isinstance(value, list) else value
            if OmegaConf.select(cfg, override.key_or_group) != value:
                wrong.append(f"{row.source}: {override.input_line} sets "
                             f"{OmegaConf.select(cfg, override.key_or_group)!r}")
    return wrong


def test_every_documented_override_composes_and_sets_what_it_says():
    _register_every_schema()
    parser = OverridesParser.create()
    wrong = []
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        rows = {(r.command, r.override): r for r in ALL_ROWS if r.override}
        for row in rows.values():
            try:
                wrong += _mismatches(row, parser)
            except Exception as error:  # noqa: BLE001 - report every row that fails
                wrong.append(f"{row.source} ({row.command}): {row.override}: {error}")
    assert not wrong, "\n".join(wrong)


def test_no_alias_shadows_an_llmtrain_name():
    own = {f.name for f in fields(Config)} | {"experiment"}
    assert not own & set(aliases.ALIASES)


def test_each_alias_becomes_its_documented_override():
    # The documented override composes (above); the command line's run through it (below).
    for row in aliases.ALIASES.values():
        value = row.override.split("=", 1)[1]
        assert rewrite([f"{row.source}={value}"]) == (
            [row.override], [f"{row.source}={value} -> {row.override}"])


def test_alias_values_are_translated_or_refused():
    assert rewrite(["lr_scheduler_type=constant_with_warmup"])[0] == [
        "optim.lr_decay_style=constant"]
    assert rewrite(["torch_dtype=bfloat16"])[0] == ["precision=bf16"]
    assert rewrite(["-m", "learning_rate=1e-5,2e-5", "optim.lr=1", "seed=3"])[0] == [
        "-m", "optim.lr=1e-5,2e-5", "optim.lr=1", "seed=3"]
    with pytest.raises(AliasError, match="lr_scheduler_type=polynomial: choose one of"):
        rewrite(["lr_scheduler_type=polynomial"])


def test_an_ms_swift_command_line_runs_as_its_llmtrain_twin():
    swift = run_llmtrain("stage=sft", "data=sft", "learning_rate=2e-5", "tp=2", "pp=1",
                         "max_grad_norm=0.5", "batch_size=2", "global_batch_size=8",
                         "logging_steps=5", "save_steps=20", "max_length=128",
                         "model_name=Xiaohuang", "model_author=ModelScope", "--cfg", "job")
    canonical = run_llmtrain("stage=sft", "data=sft", "optim.lr=2e-5",
                             "parallel.tensor_model_parallel_size=2",
                             "parallel.pipeline_model_parallel_size=1", "optim.clip_grad=0.5",
                             "stage.micro_batch_size=2", "stage.global_batch_size=8",
                             "logging.log_interval=5", "checkpoint.save_interval=20",
                             "data.seq_length=128", "data.sft.model_name=Xiaohuang",
                             "data.sft.model_author=ModelScope", "--cfg", "job")
    assert swift.stdout == canonical.stdout
    assert "[llmtrain] ms-swift argument learning_rate=2e-5 -> optim.lr=2e-5" in swift.stderr
    refused = run_llmtrain("lr_scheduler_type=polynomial", "dry_run=true", check=False)
    assert refused.returncode == 2
    assert "lr_scheduler_type=polynomial: choose one of" in refused.stderr
