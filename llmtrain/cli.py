"""The training entrypoint: Hydra composes the config, then validate, then dry-run or launch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from llmtrain.config.schedule import resolve_token_lengths
from llmtrain.config.schema import Config
from llmtrain.config.store import register
from llmtrain.config.validate import ConfigError, Machine, validate

register()
# The repository's conf/ folder (an absolute path: Hydra would read "../conf" as a module).
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def resolve(dcfg: DictConfig) -> Config:
    """The typed config, or a plain-words error naming every key left unset (???)."""
    missing = sorted(OmegaConf.missing_keys(dcfg))
    if missing:
        raise ConfigError([f"{key} must be set (it is ??? in its config group): add {key}=... "
                           f"to the command" for key in missing])
    cfg = OmegaConf.to_object(dcfg)
    if not isinstance(cfg, Config):  # the tools' own configs (convert, generate, ...)
        return cfg
    cfg = resolve_token_lengths(cfg)
    if cfg.logging.wandb_project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(["logging.wandb_project needs Weights & Biases: pip install wandb "
                           "(or leave wandb_project unset; TensorBoard logging is always on)"])
    return cfg


def prepare(cfg: Config) -> None:
    """Work done once before any worker starts (workers would race for it)."""
    if cfg.data.kind == "corpus" or cfg.data.tokenizer.tokenizer_type == "corpus":
        from llmtrain.data.corpus import ensure_corpus

        ensure_corpus()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(dcfg: DictConfig):
    from llmtrain.runtime import detect_machine, quiet_libraries

    quiet_libraries()
    try:
        cfg = resolve(dcfg)
        machine = detect_machine()
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

    print(describe(cfg, layout), flush=True)
    if cfg.dry_run:
        return None
    prepare(cfg)
    from llmtrain.launch.local import launch

    summary = launch(cfg, layout)
    out = Path(cfg.output_dir)
    print(f"[llmtrain] done: logs and TensorBoard events in {out / cfg.logging.tensorboard_dir}, "
          f"checkpoints in {out / cfg.checkpoint.save if cfg.checkpoint.save else 'nowhere'}, "
          f"summary in {out / 'summary.json'}", flush=True)
    return summary.get("final_loss")
