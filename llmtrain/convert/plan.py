"""Everything decided before a single weight is read: what the input is, which model it holds,
whether model= agrees, which files are missing, whether the layout fits the model, what gets
written. Every problem is an error that says what to do."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from llmtrain.config.schema import (
    Config,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    PeftConfig,
    StageConfig,
)
from llmtrain.config.inputs import holds_steps
from llmtrain.config.layers import moe_layers, window_layers
from llmtrain.config.layout import Layout, Machine
from llmtrain.config.validate import padded_vocab_size, validate
from llmtrain.convert import families, hf_files, legacy
from llmtrain.convert import peft as peft_files
from llmtrain.convert.check import tokenize
from llmtrain.convert.config import DIRECTIONS, DTYPES, ConvertConfig
from llmtrain.convert.families import Family
from llmtrain.convert.mapping import ConversionError, ExpertSlice
from llmtrain.convert.job import Job

# Fields that describe training rather than the architecture (not compared with model=).
# Training choices: what the weights compute does not depend on them (the experts' balancing
# losses and the expert bias's update rate included), so a run that tuned them exports.
NOT_ARCHITECTURE = ("name", "init_method_std", "attention_dropout", "hidden_dropout",
                    "make_vocab_size_divisible_by", "moe_router_load_balancing_type",
                    "moe_aux_loss_coeff", "moe_router_bias_update_rate")
DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
               "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass
class Plan:
    convert: ConvertConfig
    family: Family
    model: ModelConfig
    cfg: Config  # the Megatron side, as training would compose it
    layout: Layout
    job: Job
    # The format the input stores (the check's tolerance follows a conversion into a coarser one).
    source_dtype: str = "fp32"
    tokens_from: str = ""
    notes: list[str] = field(default_factory=list)


def _normalized(m: ModelConfig) -> dict:
    values = dataclasses.asdict(m)
    values["num_query_groups"] = m.num_query_groups or m.num_attention_heads
    values["kv_channels"] = m.kv_channels or m.hidden_size // m.num_attention_heads
    if not m.rope_scaling:
        values["rope_scaling_factor"] = None
    if m.position_embedding_type != "rope":
        values.update(rotary_base=None, rotary_percent=None)
    values["window_size"] = list(m.window_size) if m.window_size else None
    # A step or its list of layers, the same windowed layers.
    values["window_attn_skip_freq"] = window_layers(m) if m.window_size else None
    # A step or its list of layers, the same MoE layers (a dense model has none to compare).
    values["moe_layer_freq"] = moe_layers(m) if m.num_moe_experts else None
    return {k: v for k, v in values.items() if k not in NOT_ARCHITECTURE}


def differences(given: ModelConfig, found: ModelConfig) -> list[str]:
    """Each architecture field on which two model configs disagree, in words."""
    a, b = _normalized(given), _normalized(found)
    return [f"{key}: {a[key]} (model={given.name}) vs {b[key]}" for key in a if a[key] != b[key]]


def disagreement(given: ModelConfig, found: ModelConfig, source: str) -> None:
    """Raise ConversionError naming each architecture field on which `given` differs."""
    diffs = differences(given, found)
    if diffs:
        raise ConversionError(f"model={given.name} disagrees with {source} on "
                              f"{len(diffs)} field(s):\n    " + "\n    ".join(diffs)
                              + f"\n  leave model= out to take the model from {source}, or "
                                f"choose the model it holds")


def _dtype_name(value) -> Optional[str]:
    return DTYPE_NAMES.get(str(value)) if value is not None else None


def _megatron_config(c: ConvertConfig, m: ModelConfig, tp: int, pp: int,
                     ep: int = 1) -> tuple[Config, Layout]:
    """The Megatron side on TP x PP x EP processes (EP of them data-parallel: expert
    parallelism splits the experts over data-parallel ranks)."""
    seq = min(c.check_max_tokens, m.max_position_embeddings)
    cfg = Config(name=f"convert_{m.name}", seed=c.seed, device="cpu", model=m,
                 parallel=ParallelConfig(name=f"tp{tp}pp{pp}" + (f"ep{ep}" if ep > 1 else ""),
                                         tensor_model_parallel_size=tp,
                                         pipeline_model_parallel_size=pp,
                                         expert_model_parallel_size=ep, data_parallel_size=ep),
                 data=DataConfig(kind="mock", seq_length=seq),
                 stage=StageConfig(micro_batch_size=1, global_batch_size=ep),
                 launcher=c.launcher, output_dir=str(c.output or "."))
    return cfg, validate(cfg, Machine(gpus=0, has_transformer_engine=False))


def _check_options(c: ConvertConfig) -> None:
    problems = []
    if c.direction not in DIRECTIONS:
        problems.append(f"direction={c.direction} is not one of: {', '.join(DIRECTIONS)}")
    for key, value, allowed in (("dtype", c.dtype, (None, *DTYPES)),
                                ("check_dtype", c.check_dtype, DTYPES)):
        if value not in allowed:
            problems.append(f"{key}={value} is not one of: {', '.join(DTYPES)}")
    if not c.check_only and not c.output:
        problems.append("output= must be set: the folder to write (or check_only=true)")
    if c.check_only and c.direction == "megatron_to_mcore":
        problems.append("check_only=true applies to hf_to_mcore and mcore_to_hf (a Megatron-LM "
                        "import is verified by reading back what it wrote)")
    if c.output and not c.check_only:
        out = Path(c.output)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            problems.append(f"output={out} exists and is not empty: choose a new folder (nothing "
                            f"is overwritten)")
        else:
            problems += _unwritable(out)
    if problems:
        raise ConversionError("the conversion has problem(s):\n  - " + "\n  - ".join(problems))


def _unwritable(out: Path) -> list[str]:
    """The output, or the folder it would be made in, must take files: checked before a weight
    is read (a read-only file system, no permission, a file in the way)."""
    from llmtrain.data.sources import DataError, check_writable

    existing = out.absolute()
    while not existing.exists():
        existing = existing.parent
    try:
        check_writable(existing, f"output={out}")
    except DataError as error:
        return [str(error)]
    return []


def _job(c: ConvertConfig, m: ModelConfig, dtype: str, sequences, **extra) -> Job:
    return Job(direction=c.direction, input=str(Path(c.input).resolve()),
               output=None if c.check_only else str(Path(c.output).resolve()),
               model=m, dtype=dtype, check_dtype=c.check_dtype if c.check or c.check_only
               else None, sequences=sequences,
               max_shard_bytes=int(c.max_shard_size_gb * 10**9), **extra)


def _tied_head(reader: hf_files.HFReader, mapping, m: ModelConfig, folder: Path) -> set[str]:
    """{lm_head.weight} where a tied model's file stores it too (some published ones do): it is
    the embedding again, left out; one that differs from it is refused."""
    head = "lm_head.weight"
    if not m.share_embeddings_and_output_weights or head not in reader.names():
        return set()
    import torch

    embedding = mapping.rule("embedding.word_embeddings.weight").hf[0]
    a, b = reader.read(head), reader.read(embedding)
    if a.shape != b.shape or not torch.equal(a, b):
        difference = (f"by up to {(a.float() - b.float()).abs().max().item():.3g}"
                      if a.shape == b.shape else f"in shape, {list(a.shape)} vs {list(b.shape)}")
        raise ConversionError(f"{folder} stores {head}, which differs from {embedding} "
                              f"{difference}, though its config.json ties them "
                              f"(tie_word_embeddings=true): set tie_word_embeddings to false "
                              f"in config.json to keep both")
    return {head}


def _extra_layers(names: set[str], family: Family, m: ModelConfig) -> dict[str, int]:
    """{tensor: layer} of the layers past num_layers that the family's checkpoints may hold."""
    if not family.extra_layers:
        return {}
    layer = re.compile(rf"^{re.escape(family.layers)}\.(\d+)\.")
    found = {n: int(match[1]) for n in names if (match := layer.match(n))}
    return {n: i for n, i in found.items() if i >= m.num_layers}


def _check_tensor_names(reader: hf_files.HFReader, family: Family, m: ModelConfig,
                        folder: Path) -> list[str]:
    """Refuse missing and unplaced tensors; return the notes on what is skipped."""
    mapping = family.mapping(m)
    present = set(reader.names()) - _tied_head(reader, mapping, m, folder)
    skipped = _extra_layers(present, family, m)
    present -= set(skipped)
    missing = [n for n in mapping.hf_names() if n not in present]
    unused = [n for n in present if n not in mapping.by_hf and not mapping.is_ignored(n)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the {family.name} mapping needs are missing "
                        f"from {folder}: {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    if unused:
        problems.append(f"{len(unused)} tensor(s) of {folder} have no place in the Megatron "
                        f"model (a feature its config does not declare?): "
                        f"{', '.join(sorted(unused)[:8])}" + (" ..." if len(unused) > 8 else ""))
    if problems:
        raise ConversionError("\n".join(problems))
    if not skipped:
        return []
    layers = ", ".join(map(str, sorted(set(skipped.values()))))
    return [f"skipped {len(skipped)} tensor(s) of layer(s) {layers} "
            f"({family.extra_layers}, past the {m.num_layers} layers): llmtrain does not "
            f"train {family.extra_layers}, and the converted model goes without it"]


def _check_shapes(reader: hf_files.HFReader, hf_config, folder: Path) -> None:
    """Every stored tensor has the shape its config.json gives it (read from the files' headers,
    against the Hugging Face model built without memory, under the names it saves: transformers
    holds a MoE layer's experts as one fused tensor but stores each expert's own): a config that
    does not describe the weights is refused before any is read."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
        expected = {name: list(t.shape) for name, t in
                    revert_weight_conversion(model, model.state_dict()).items()}
    wrong = [f"{name} in {file}: {shape}, config.json makes it {expected[name]}"
             for name, (file, shape) in reader.shapes().items()
             if name in expected and expected[name] != shape]
    if wrong:
        raise ConversionError(f"{len(wrong)} tensor(s) of {folder} do not have the shape "
                              f"{folder / hf_files.CONFIG} gives them:\n    "
                              + "\n    ".join(wrong[:8]) + (" ..." if len(wrong) > 8 else "")
                              + "\n  the config does not describe these weights: use the "
                                "config.json published with them")


def hf_model(folder: Path, name: Optional[str] = None):
    """(Hugging Face config, family, model config) of the config.json in `folder`, the model
    named `name` or after the folder."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(folder))
    family = families.for_hf_config(hf_config)
    return hf_config, family, ModelConfig(name=name or families.model_name(folder),
                                          **family.model_fields(hf_config))


def _model_of(c: ConvertConfig, folder: Path):
    """`hf_model` of `folder`; model= must agree with it."""
    hf_config, family, found = hf_model(folder, c.model.name if c.model else None)
    if c.model:
        disagreement(c.model, found, f"{folder / hf_files.CONFIG}")
    return hf_config, family, c.model or found


def _plan_hf_to_mcore(c: ConvertConfig) -> Plan:
    folder = Path(c.input)
    missing = hf_files.missing_files(folder)
    if missing:
        raise ConversionError(f"the Hugging Face checkpoint at {folder} lacks: "
                              + ", ".join(missing) + ("; it holds a Megatron checkpoint: add "
                              "direction=mcore_to_hf to convert it to Hugging Face"
                              if holds_steps(folder) else ""))
    hf_config, family, m = _model_of(c, folder)
    cfg, layout = _megatron_config(c, m, c.tensor_model_parallel_size,
                                   c.pipeline_model_parallel_size, c.expert_model_parallel_size)
    reader = hf_files.HFReader(folder, family.base_prefix)
    _check_shapes(reader, hf_config, folder)
    notes = _check_tensor_names(reader, family, m, folder)
    source = _dtype_name(getattr(hf_config, "dtype", None)) or _dtype_name(
        reader.dtype()) or "fp32"
    sequences, tokens_from = tokenize(folder, c.prompts, m.vocab_size, cfg.data.seq_length, c.seed)
    return Plan(c, family, m, cfg, layout, _job(c, m, c.dtype or source, sequences),
                source_dtype=source, tokens_from=tokens_from, notes=notes)


def _read_mcore(root: Path) -> tuple[Path, int]:
    """(save folder, step) of a Megatron-Core checkpoint given by its save folder or a step."""
    from llmtrain.megatron import checkpoint

    if (root / "metadata.json").exists() and re.fullmatch(r"iter_\d{7}", root.name):
        return root.parent, int(root.name[5:])
    if legacy.is_legacy(root):
        raise ConversionError(f"{root} is a Megatron-LM torch-format checkpoint: import it "
                              f"first with direction=megatron_to_mcore")
    iteration = checkpoint.latest_iteration(root)
    if iteration is None:
        raise ConversionError(f"{root} lacks {checkpoint.TRACKER}: point input= at a checkpoint "
                              f"folder (where training saved) or at one of its iter_NNNNNNN/")
    step = checkpoint.step_dir(root, iteration)
    if not (step / "metadata.json").exists():
        raise ConversionError(f"{checkpoint.TRACKER} names step {iteration}, but "
                              f"{step.name}/metadata.json is missing from {root}: point "
                              f"input= at one of its complete iter_NNNNNNN/ folders")
    return root, iteration


def _adapter(root: Path, iteration: int) -> Optional[tuple[str, PeftConfig]]:
    from llmtrain.megatron.lora_checkpoint import adapter_of

    try:
        return adapter_of(root, iteration)
    except ValueError as exc:
        raise ConversionError(str(exc)) from None


def _plan_lora_to_peft(c: ConvertConfig) -> Plan:
    from llmtrain.generate.plan import run_config

    root, iteration = _read_mcore(Path(c.input))
    adapter = _adapter(root, iteration)
    run = run_config(root)
    if adapter is None or run is None:
        raise ConversionError(f"{root} holds no LoRA adapters of a peft=lora training run: "
                              f"direction=lora_to_peft exports those; a whole model goes out "
                              f"with direction=mcore_to_hf")
    m = c.model or ModelConfig(**run["model"])
    family = families.by_name(m.family)
    if family.name not in peft_files.FAMILIES:
        raise ConversionError(f"direction=lora_to_peft supports Llama-style families "
                              f"({', '.join(peft_files.FAMILIES)}), not {family.name}: merge the "
                              f"adapters with direction=mcore_to_hf instead")
    cfg, layout = _megatron_config(c, m, c.tensor_model_parallel_size,
                                   c.pipeline_model_parallel_size)
    job = dataclasses.replace(_job(c, m, c.dtype or "fp32", []), input=str(root.resolve()),
                              iteration=iteration, check_dtype=None, base=adapter[0],
                              peft=adapter[1])
    return Plan(c, family, m, cfg, layout, job, source_dtype=job.dtype)


def _plan_mcore_to_hf(c: ConvertConfig) -> Plan:
    from llmtrain.megatron import checkpoint

    from llmtrain.generate.plan import run_config, run_tokenizer_folder

    root, iteration = _read_mcore(Path(c.input))
    adapter = _adapter(root, iteration)  # merged into its base on the way out
    run = run_config(root)  # a training run's checkpoints: its model and tokenizer
    if (root / hf_files.CONFIG).exists():
        _, family, m = _model_of(c, root)
    elif c.model or run is not None:
        m = c.model or ModelConfig(**run["model"])
        family = families.by_name(m.family)
        # The Hugging Face config written must describe the same model.
        disagreement(m, ModelConfig(name=m.name, **family.model_fields(family.hf_config(m))),
                     f"what a {family.architecture} config can express")
    else:
        raise ConversionError(f"{root} has no {hf_files.CONFIG} and no training run config "
                              f"beside it saying which model it holds: add model=<name> (one of "
                              f"conf/model/)")
    if c.expert_model_parallel_size > 1 and any(isinstance(rule.transform, ExpertSlice)
                                                for rule in family.rules(m)):
        raise ConversionError(f"{family.name} checkpoints hold each layer's experts in one "
                              f"tensor, which the way back writes from one process: leave "
                              f"expert_model_parallel_size at 1 (the experts still load under "
                              f"any expert parallel size)")
    cfg, layout = _megatron_config(c, m, c.tensor_model_parallel_size,
                                   c.pipeline_model_parallel_size, c.expert_model_parallel_size)
    stored = checkpoint.stored_tensors(Path(adapter[0]) if adapter else
                                       checkpoint.step_dir(root, iteration))
    embedding = stored.get("embedding.word_embeddings.weight")
    if embedding is None or embedding[0][1] != m.hidden_size or embedding[0][0] < m.vocab_size:
        raise ConversionError(f"{checkpoint.step_dir(root, iteration)} does not hold a model of "
                              f"hidden size {m.hidden_size} and vocabulary {m.vocab_size} "
                              f"(its word embedding is {embedding[0] if embedding else 'missing'})"
                              f": choose the model= it was trained as")
    source = _dtype_name(embedding[1]) or "fp32"
    if not c.tokenizer and run is not None and run_tokenizer_folder(run):
        c = dataclasses.replace(c, tokenizer=str(run_tokenizer_folder(run)))
    tokenizer = root if hf_files.has_tokenizer(root) else (Path(c.tokenizer) if c.tokenizer
                                                             else None)
    sequences, tokens_from = tokenize(tokenizer, c.prompts, m.vocab_size, cfg.data.seq_length,
                                      c.seed)
    without_prefix = hf_files.read_layout(root)[0]
    job = _job(c, m, c.dtype or source, sequences, iteration=iteration,
               strip_prefix=family.base_prefix if without_prefix else "",
               base=adapter and adapter[0], peft=adapter and adapter[1])
    job = dataclasses.replace(job, input=str(root.resolve()))
    # Merged weights W + (alpha / r) B A are computed in fp32 and rounded to the written format,
    # so a bf16 export of them is judged by bf16's tolerances (run.tolerance_dtype).
    plan = Plan(c, family, m, cfg, layout, job, source_dtype="fp32" if adapter else source,
                tokens_from=tokens_from)
    if tokenizer is None:
        plan.notes.append("no tokenizer: the Hugging Face folder gets none (add tokenizer=<dir>)")
    return plan


def _plan_megatron_to_mcore(c: ConvertConfig) -> Plan:
    root = Path(c.input)
    found_ckpt = legacy.find(root)
    first = legacy.read(found_ckpt.file(0, 0))
    if "args" not in first:
        raise ConversionError(f"{found_ckpt.file(0, 0)} has no training arguments ('args'): it "
                              f"was not written by Megatron-LM")
    args = first["args"]
    fields = legacy.model_fields(args)
    tp, pp = found_ckpt.tensor_model_parallel_size, found_ckpt.pipeline_model_parallel_size
    found = ModelConfig(name=c.model.name if c.model else families.model_name(root), **fields)
    if c.model:
        padded = padded_vocab_size(c.model.vocab_size, c.model.make_vocab_size_divisible_by, tp)
        if padded != args.padded_vocab_size:
            raise ConversionError(f"model={c.model.name} has vocab_size {c.model.vocab_size}, "
                                  f"padded to {padded} at TP {tp}, but the checkpoint's "
                                  f"embedding has {args.padded_vocab_size} rows: give the "
                                  f"model= it was trained as, or leave model= out")
        disagreement(c.model, dataclasses.replace(found, vocab_size=c.model.vocab_size,
                                                  family=c.model.family),
                     f"the training arguments in {found_ckpt.file(0, 0)}")
    m = c.model or found
    cfg, layout = _megatron_config(c, m, tp, pp)
    embedding = legacy.model_state(first, found_ckpt.file(0, 0)).get(
        "embedding.word_embeddings.weight")
    source = _dtype_name(embedding.dtype if embedding is not None else None) or "fp32"
    del first
    plan = Plan(c, families.by_name(m.family), m, cfg, layout,
                _job(c, m, c.dtype or source, [], legacy=found_ckpt), source_dtype=source)
    if (c.tensor_model_parallel_size, c.pipeline_model_parallel_size) not in ((1, 1), (tp, pp)):
        plan.notes.append(f"the checkpoint is split TP {tp} x PP {pp}: it is read under that "
                          f"layout (the written checkpoint loads under any)")
    if not c.model:
        plan.notes.append(f"model taken from the training arguments (family guessed: {m.family}; "
                          f"vocab_size {m.vocab_size} includes Megatron's padding): pass "
                          f"model=<name> for the exact vocabulary")
    return plan


def prepare(c: ConvertConfig) -> Plan:
    """The conversion's plan, or a ConversionError / ConfigError saying what is wrong."""
    _check_options(c)
    if not Path(c.input).exists():
        raise ConversionError(f"input={c.input} does not exist: check the path")
    return {"hf_to_mcore": _plan_hf_to_mcore, "mcore_to_hf": _plan_mcore_to_hf,
            "megatron_to_mcore": _plan_megatron_to_mcore,
            "lora_to_peft": _plan_lora_to_peft}[c.direction](c)
