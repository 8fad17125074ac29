"""`python -m llmtrain.convert`: Hydra composes conf/convert.yaml, then plan, convert, verify."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from llmtrain.cli import CONF_DIR, resolve
from llmtrain.config.store import register as register_training
from llmtrain.config.validate import ConfigError
from llmtrain.convert.config import register
from llmtrain.convert.hf_files import has_tokenizer
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
    if not where:
        print(f"[convert] check passed in {report['seconds']} s (nothing written)", flush=True)
        return
    print(f"[convert] done in {report['seconds']} s: {where}", flush=True)
    if report.get("model_config"):
        # A model of the zoo is found in conf/; any other in the model config written beside it.
        search = "" if plan.convert.model else f"hydra.searchpath=[file://{where}] "
        tokenizer = (f" data.tokenizer.tokenizer_model={where}"
                     if has_tokenizer(Path(where)) else "")
        print(f"[convert] train from it: python -m llmtrain {search}model={plan.model.name} "
              f"checkpoint.load={where} checkpoint.finetune=true data=indexed "
              f"data.data_path=[<your data prefix>]{tokenizer}", flush=True)
