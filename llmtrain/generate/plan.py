"""Everything decided before a weight is read: which step of which checkpoint, which model and
tokenizer it holds, and the process layout that runs it. Shared by generate, serve and evaluate.

A checkpoint says what it holds in one of these ways, tried in order: model= on the command line;
the model config a conversion wrote beside it (`model/<name>.yaml`, then `config.json`); the
config of the training run it belongs to (`<run>/.hydra/config.yaml`, with its tokenizer). The
tokenizer is `tokenizer=`, the one beside the checkpoint, or the training run's.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from llmtrain.config.schema import (
    Config,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    PeftConfig,
    PrecisionConfig,
    StageConfig,
    TokenizerConfig,
)
from llmtrain.config.layout import Layout
from llmtrain.config.validate import validate
from llmtrain.generate.config import DTYPES, InferenceConfig

DEFAULT_MAX_SEQ_LENGTH = 4096
_STEP = re.compile(r"iter_(\d{7})")


class InferenceError(ValueError):
    """Input that cannot run; the message says what to do."""


@dataclass(frozen=True)
class Plan:
    """A checkpoint ready to load: every worker gets this."""

    root: str  # the checkpoint's save folder
    iteration: int
    model: ModelConfig
    tokenizer: TokenizerConfig
    # Where tokenizer side files live (chat template, generation config), if anywhere.
    tokenizer_folder: Optional[str]
    cfg: Config  # the Megatron side, as training would compose it
    layout: Layout
    max_batch_size: int
    max_sequence_length: int
    seed: int
    engine: str = "auto"
    # A reward model (a scalar head in place of the output layer): it scores, it cannot generate.
    reward_model: bool = False


def _locate(load: str) -> tuple[Path, int]:
    """(save folder, step) of a checkpoint given by its save folder or one iter_NNNNNNN/."""
    from llmtrain.megatron import checkpoint

    path = Path(load)
    if not path.exists():
        raise InferenceError(f"load={load} does not exist: check the path (a checkpoint "
                             f"folder or one of its iter_NNNNNNN/)")
    match = _STEP.fullmatch(path.name)
    if match and (path / "metadata.json").exists():
        return path.parent, int(match.group(1))
    iteration = checkpoint.latest_iteration(path)
    if iteration is None:
        raise InferenceError(f"{path} holds no checkpoint ({checkpoint.TRACKER} is missing): "
                             f"point load= at the folder training saved into or a conversion "
                             f"wrote, or at one of its iter_NNNNNNN/ folders")
    step = checkpoint.step_dir(path, iteration)
    if not (step / "metadata.json").exists():
        raise InferenceError(f"{checkpoint.TRACKER} in {path} names step {iteration}, but "
                             f"{step.name}/ is missing or incomplete: point load= at one of "
                             f"its complete iter_NNNNNNN/ folders")
    return path, iteration


def run_config(root: Path) -> Optional[dict]:
    """The resolved config of the training run whose checkpoints `root` holds."""
    path = root.parent / ".hydra" / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else None


def run_tokenizer_folder(run: dict) -> Optional[Path]:
    """The folder of a training run's tokenizer (which also holds its chat template and
    generation_config.json), when it was given as a folder or a file in one."""
    model = run["data"]["tokenizer"].get("tokenizer_model")
    source = Path(model) if model else None
    if source is not None and source.is_file():
        source = source.parent
    return source if source is not None and source.is_dir() else None


def _model(c: InferenceConfig, root: Path, run: Optional[dict]) -> ModelConfig:
    if c.model is not None:
        return c.model
    written = sorted((root / "model").glob("*.yaml"))
    if len(written) == 1:
        return ModelConfig(**yaml.safe_load(written[0].read_text()))
    if (root / "config.json").exists():
        from transformers import AutoConfig

        from llmtrain.convert import families
        from llmtrain.convert.mapping import ConversionError

        hf_config = AutoConfig.from_pretrained(str(root))
        try:
            family = families.for_hf_config(hf_config)
            return ModelConfig(name=families.model_name(root), **family.model_fields(hf_config))
        except ConversionError as error:
            raise InferenceError(f"{root / 'config.json'}: {error}") from None
    if run is not None:
        return ModelConfig(**run["model"])
    raise InferenceError(f"{root} does not say which model it holds (no model/<name>.yaml, "
                         f"config.json or training run config beside it): add model=<name> "
                         f"(one of conf/model/)")


def _check_shapes(model: ModelConfig, root: Path, iteration: int) -> bool:
    """The checkpoint must hold this model: its embedding and layer count, from the metadata.
    True when it is a reward model."""
    from llmtrain.megatron import checkpoint

    from llmtrain.megatron.lora_checkpoint import adapter_of

    step = checkpoint.step_dir(root, iteration)
    try:
        adapter = adapter_of(root, iteration)  # a LoRA run's step: the shapes are its base's
    except ValueError as exc:
        raise InferenceError(str(exc)) from None
    stored = checkpoint.stored_tensors(Path(adapter[0]) if adapter else step)
    heads = stored if adapter is None else checkpoint.stored_tensors(step)  # a LoRA rm's: its own
    embedding = stored.get("embedding.word_embeddings.weight", ([0, 0], None))[0]
    layers = {shape[0] for name, (shape, _) in stored.items()
              if name.startswith("decoder.layers.") and name.endswith(".weight")
              and len(shape) == 3}
    found = f"hidden size {embedding[1]}, {embedding[0]} embedding rows" + (
        f", {layers.pop()} layers" if len(layers) == 1 else "")
    if (embedding[1] != model.hidden_size or embedding[0] < model.vocab_size
            or (layers and model.num_layers not in layers)):
        raise InferenceError(f"{step} holds a model of {found}; model {model.name} has hidden "
                             f"size {model.hidden_size}, vocabulary {model.vocab_size} and "
                             f"{model.num_layers} layers: give the model= it was trained as")
    return any(name.startswith(checkpoint.HEADS) for name in heads)


def _peft(c: InferenceConfig, model: ModelConfig, root: Path, iteration: int,
          reward_model: bool) -> PeftConfig:
    """peft_load's adapter as the settings that load it (peft.load), checked against the model."""
    if not c.peft_load:
        return PeftConfig()
    from llmtrain.config.peft import peft_settings
    from llmtrain.megatron.lora_checkpoint import adapter_of

    if reward_model or adapter_of(root, iteration) is not None:
        raise InferenceError(f"peft_load={c.peft_load} goes onto a language model, but step "
                             f"{iteration} of {root} holds "
                             f"{'a reward model' if reward_model else 'LoRA adapters already'}: "
                             f"give load= the base model the adapter was trained on")
    peft, problems = peft_settings(PeftConfig(name="lora", load=c.peft_load), model)
    if problems:
        raise InferenceError("the adapter cannot load:\n  - " + "\n  - ".join(
            p.replace("peft.load=", "peft_load=") for p in problems))
    return peft


def tokenizer_in(folder: Path) -> Optional[TokenizerConfig]:
    """The tokenizer files of a folder (or a tokenizer file) as a tokenizer config."""
    if folder.is_file():
        kind = "sentencepiece" if folder.suffix == ".model" else "huggingface"
        return TokenizerConfig(tokenizer_type=kind, tokenizer_model=str(folder))
    if (folder / "tokenizer.json").exists():
        return TokenizerConfig(tokenizer_type="huggingface", tokenizer_model=str(folder))
    if (folder / "tokenizer.model").exists():
        return TokenizerConfig(tokenizer_type="sentencepiece",
                               tokenizer_model=str(folder / "tokenizer.model"))
    if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
        return TokenizerConfig(tokenizer_type="gpt2bpe", vocab_file=str(folder / "vocab.json"),
                               merge_file=str(folder / "merges.txt"))
    return None


def _tokenizer(c: InferenceConfig, root: Path, run: Optional[dict], needed: bool
               ) -> tuple[TokenizerConfig, Optional[str]]:
    if c.tokenizer:
        given = Path(c.tokenizer)
        found = tokenizer_in(given) if given.exists() else None
        if found is None:
            raise InferenceError(f"tokenizer={c.tokenizer} is neither a tokenizer file nor a "
                                 f"folder with tokenizer.json, tokenizer.model or "
                                 f"vocab.json + merges.txt")
        return found, str(given if given.is_dir() else given.parent)
    found = tokenizer_in(root)
    if found is not None:
        return found, str(root)
    if run is not None:
        folder = run_tokenizer_folder(run)
        return TokenizerConfig(**run["data"]["tokenizer"]), str(folder) if folder else None
    if not needed:
        return TokenizerConfig(tokenizer_type="null"), None
    raise InferenceError(f"{root} has no tokenizer beside it and is not a training run's "
                         f"checkpoint folder: add tokenizer=<folder or file>")


def _precision(dtype: str) -> PrecisionConfig:
    return PrecisionConfig(name=dtype, bf16=dtype == "bf16", fp16=dtype == "fp16")


def prepare(c: InferenceConfig, machine=None, needs_tokenizer: bool = True,
            scores: bool = False) -> Plan:
    """The plan of an inference job, or an InferenceError / ConfigError saying what is wrong.
    Without `needs_tokenizer` (token ids in and out) a checkpoint without one is fine; a reward
    model only where the job `scores` (the server)."""
    from llmtrain.runtime import detect_machine

    problems = []
    if c.dtype not in (None, *DTYPES):
        problems.append(f"dtype={c.dtype} is not one of: {', '.join(DTYPES)}")
    if c.inference_max_batch_size < 1:
        problems.append(f"inference_max_batch_size={c.inference_max_batch_size} must be at "
                        f"least 1")
    if c.engine not in ("auto", "megatron"):
        problems.append(f"engine={c.engine} is not one of: auto, megatron")
    if c.device not in (None, "cpu", "cuda"):
        problems.append(f"device={c.device} is not one of: cpu, cuda")
    if problems:
        raise InferenceError("the configuration has problem(s):\n  - " + "\n  - ".join(problems))
    root, iteration = _locate(c.load)
    run = run_config(root)
    model = _model(c, root, run)
    reward_model = _check_shapes(model, root, iteration)
    if reward_model and not scores:
        raise InferenceError(f"step {iteration} of {root} holds a reward model (a scalar "
                             f"head, no output layer): it scores text rather than generating "
                             f"it. Serve its scores with python -m llmtrain.serve load={c.load} "
                             f"(POST /v1/rewards), or load a language model")
    peft = _peft(c, model, root, iteration, reward_model)
    tokenizer, folder = _tokenizer(c, root, run, needs_tokenizer)
    machine = machine or detect_machine()
    device = c.device or ("cuda" if machine.gpus else "cpu")
    dtype = c.dtype or ("bf16" if device == "cuda" else "fp32")
    seq = c.inference_max_seq_length or min(model.max_position_embeddings,
                                            DEFAULT_MAX_SEQ_LENGTH)
    if seq > model.max_position_embeddings and model.position_embedding_type == \
            "learned_absolute":
        raise InferenceError(f"inference_max_seq_length={seq} exceeds the "
                             f"{model.max_position_embeddings} learned positions of model "
                             f"{model.name}: set inference_max_seq_length="
                             f"{model.max_position_embeddings} or less")
    tp, pp = c.tensor_model_parallel_size, c.pipeline_model_parallel_size
    cfg = Config(name=f"inference_{model.name}", seed=c.seed, device=device, model=model,
                 parallel=ParallelConfig(name=f"tp{tp}pp{pp}", tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp,
                                         sequence_parallel=False),
                 precision=_precision(dtype), data=DataConfig(kind="mock", seq_length=seq),
                 stage=StageConfig(micro_batch_size=1, global_batch_size=1),
                 launcher=dataclasses.replace(c.launcher, nproc_per_node=max(tp, 1) * max(pp, 1)),
                 output_dir=".")
    layout = validate(cfg, machine)
    cfg.peft = peft  # checked by _peft: validate's peft checks are training's
    return Plan(root=str(root.resolve()), iteration=iteration, model=model, tokenizer=tokenizer,
                tokenizer_folder=folder, cfg=cfg, layout=layout,
                max_batch_size=c.inference_max_batch_size, max_sequence_length=seq, seed=c.seed,
                engine=c.engine, reward_model=reward_model)


def generation_eos_ids(folder: Optional[str]) -> list[int]:
    """End-of-sequence ids of a generation_config.json (Llama 3 Instruct lists several)."""
    path = Path(folder) / "generation_config.json" if folder else None
    if path is None or not path.exists():
        return []
    value = json.loads(path.read_text()).get("eos_token_id")
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]

