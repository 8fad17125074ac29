"""`python -m llmtrain.convert`: Hydra composes conf/convert.yaml, then plan, convert, verify."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from llmtrain.cli import CONF_DIR, resolve
from llmtrain.config.store import register as register_training
from llmtrain.config.validate import ConfigError
from llmtrain.convert.config import register
from llmtrain.convert.mapping import ConversionError

register()
register_training()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="convert")
def main(dcfg: DictConfig) -> None:
    from llmtrain.runtime import quiet_libraries

    quiet_libraries()
    from llmtrain.convert.plan import prepare
    from llmtrain.convert.run import CheckFailed, execute

    try:
        plan = prepare(resolve(dcfg))
    except (ConversionError, ConfigError) as error:
        print(f"llmtrain.convert: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        report = execute(plan)
    except CheckFailed as error:
        print(f"llmtrain.convert: {error}", file=sys.stderr)
        sys.exit(1)
    where = report.get("output")
    if where:
        print(f"[convert] done in {report['seconds']} s: {where}", flush=True)
        if report.get("model_config"):
            print(f"[convert] train from it: python -m llmtrain "
                  f"hydra.searchpath=[file://{where}] model={plan.model.name} "
                  f"checkpoint.load={where} checkpoint.finetune=true "
                  f"data.tokenizer.tokenizer_type=huggingface "
                  f"data.tokenizer.tokenizer_model={where} ...", flush=True)
    else:
        print(f"[convert] check passed in {report['seconds']} s (nothing written)", flush=True)
