"""peft=lora's settings as a run uses them: those given, the rest from the PEFT folder that
peft.load names (its adapter_config.json), else LORA_DEFAULTS. Pure Python: validation reports
the folder's problems and any given value that contradicts it before anything launches."""

from __future__ import annotations

import dataclasses

from llmtrain.config.schema import LORA_DEFAULTS, Config, ModelConfig, PeftConfig
from llmtrain.config.validate import lora_targets


def peft_settings(peft: PeftConfig, model: ModelConfig) -> tuple[PeftConfig, list[str]]:
    """(peft with every setting filled, problems)."""
    if peft.name != "lora":
        return peft, []
    found, problems = {}, []
    if peft.load:
        from llmtrain.convert.peft import CONFIG, imported

        found, problems = imported(peft.load, model)
        for key, value in found.items():
            given = getattr(peft, key)
            if key == "target_modules" and given is not None:  # all-linear: every layer
                given = list(lora_targets(dataclasses.replace(peft, target_modules=given)))
            if given is not None and given != value:
                problems.append(f"peft.{key}={given} contradicts {key}={value} of the adapter "
                                f"(peft.load={peft.load}, its {CONFIG}): drop peft.{key}, "
                                f"which peft.load gives")
    filled = {key: next(v for v in (getattr(peft, key), found.get(key), default)
                        if v is not None)
              for key, default in LORA_DEFAULTS.items()}
    return dataclasses.replace(peft, **filled), problems


def resolve_peft(cfg: Config) -> Config:
    """cfg with its peft settings filled (validation reports the problems)."""
    cfg.peft = peft_settings(cfg.peft, cfg.model)[0]
    return cfg
