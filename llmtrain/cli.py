"""The training entrypoint: Hydra composes the config, then validate, then dry-run or launch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from llmtrain import hf_load
from llmtrain.config import inputs, overrides
from llmtrain.config.aliases import AliasError, rewrite
from llmtrain.config.layout import Machine
from llmtrain.config.peft import resolve_peft
from llmtrain.config.schedule import resolve_token_lengths
from llmtrain.config.schema import Config
from llmtrain.config.store import register
from llmtrain.config.validate import ConfigError, validate
from llmtrain.data.hub import resolve_hub_datasets
from llmtrain.data.sources import DataError
from llmtrain.launch import launch, runs_here, target_machine

register()
# The repository's conf/ folder (an absolute path: Hydra would read "../conf" as a module).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def resolve(dcfg: DictConfig):
    """The typed config of any llmtrain tool, or a plain-words error naming every key left
    unset (???)."""
    missing = sorted(OmegaConf.missing_keys(dcfg))
    if missing:
        raise ConfigError([f"{key} must be set (it is ??? in its config group): add {key}=... "
                           f"to the command" for key in missing])
    return OmegaConf.to_object(dcfg)


def resolve_run(dcfg: DictConfig) -> Config:
    """A training run's typed config, with run lengths given in tokens turned into iterations,
    peft's settings filled (from peft.load's folder, or the defaults) and datasets named in the
    local Hugging Face cache (hf://datasets/...) found there."""
    cfg = resolve_hub_datasets(resolve_peft(resolve_token_lengths(resolve(dcfg))))
    missing = [f"logging.{key} needs {name}: pip install 'llmtrain[{extra}]' (or leave "
               f"logging.{key} unset)"
               for key, extra, name in (("wandb_project", "wandb", "Weights & Biases"),
                                        ("mlflow_tracking_uri", "mlflow", "MLflow"))
               if getattr(cfg.logging, key) and importlib.util.find_spec(extra) is None]
    if missing:
        raise ConfigError(missing)
    return cfg


def prepare(cfg: Config) -> None:
    """Work done once before any worker starts (workers would race for it)."""
    hf_load.prepare(cfg)
    if cfg.data.kind == "corpus" or cfg.data.tokenizer.tokenizer_type == "corpus":
        from llmtrain.data.corpus import ensure_corpus

        ensure_corpus()
    if cfg.data.kind == "sft" and cfg.stage.epochs:
        from llmtrain.data.sft import derive_train_iters

        print(f"[llmtrain] {derive_train_iters(cfg, Path(cfg.output_dir) / 'data_cache')}",
              flush=True)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(dcfg: DictConfig):
    from llmtrain.runtime import quiet_libraries

    quiet_libraries()
    try:
        cfg = resolve_run(dcfg)
        hf_load.check_model(cfg)
        machine = target_machine(cfg)
        if cfg.dry_run and cfg.device == "cuda" and machine.gpus == 0:
            # Planning a GPU job from a machine without one (a laptop, a login node).
            machine = Machine(gpus=cfg.launcher.nproc_per_node or 8, has_transformer_engine=True)
            print(f"[llmtrain] no GPU here: planning for {machine.gpus} GPUs per node with "
                  f"Transformer Engine", flush=True)
        layout = validate(cfg, machine)
    except ConfigError as error:
        print(f"llmtrain: {error}", file=sys.stderr)
        sys.exit(2)
    from llmtrain.config.plan import describe

    if cfg.dry_run:
        print(describe(cfg, layout, steps_counted=not cfg.stage.epochs), flush=True)
        return None
    try:
        wrong, warnings = inputs.problems(cfg, layout, here=runs_here(cfg))
        if wrong:
            raise ConfigError(wrong)
        for warning in warnings:
            print(f"[llmtrain] {warning}", file=sys.stderr, flush=True)
        prepare(cfg)
        if cfg.stage.epochs:  # the schedule again, with train_iters derived from the data
            layout = validate(cfg, machine)
    except (ConfigError, DataError) as error:
        print(f"llmtrain: {error}", file=sys.stderr)
        sys.exit(2)
    print(describe(cfg, layout), flush=True)
    summary = launch(cfg, layout)
    if summary is None:  # submitted: it runs elsewhere (launcher=slurm)
        return None
    out = Path(cfg.output_dir)
    print(f"[llmtrain] done: logs and TensorBoard events in {out / cfg.logging.tensorboard_dir}, "
          f"checkpoints in {out / cfg.checkpoint.save if cfg.checkpoint.save else 'nowhere'}, "
          f"summary in {out / 'summary.json'}", flush=True)
    return summary.get("final_loss")


def run() -> None:
    """`python -m llmtrain`: ms-swift's argument names (learning_rate=, tp=, ...) become
    llmtrain's overrides (docs/migrate_ms_swift.md), a Hugging Face checkpoint.load adds its
    model and tokenizer (llmtrain/hf_load.py), then Hydra composes."""
    try:
        args, notes = rewrite(sys.argv[1:])
    except AliasError as error:
        print(f"llmtrain: {error}", file=sys.stderr)
        sys.exit(2)
    for note in notes:
        print(f"[llmtrain] ms-swift argument {note}", file=sys.stderr, flush=True)
    wrong = overrides.problems(args)
    if wrong:
        print(f"llmtrain: {ConfigError(wrong)}", file=sys.stderr)
        sys.exit(2)
    try:
        args, added = hf_load.overrides(args)
    except ConfigError as error:
        print(f"llmtrain: {error}", file=sys.stderr)
        sys.exit(2)
    if added:
        print(f"[llmtrain] checkpoint.load is a Hugging Face folder: {' '.join(added)}",
              flush=True)
    sys.argv[1:] = args
    main()
