"""Hugging Face checkpoint folders: which files they need, reading tensors one at a time, writing
sharded safetensors as transformers does, and carrying config and tokenizer files along."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

CONFIG = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Files that hold weights (not carried along as side files).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf", ".ckpt")
WEIGHT_INDEXES = (SAFE_INDEX, BIN_INDEX)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def weight_files(folder: Path) -> dict[str, str]:
    """{tensor name: file} from the folder's index, or every tensor of its single file; {} when
    the folder has no weights (see `missing_files`)."""
    for index in WEIGHT_INDEXES:
        if (folder / index).exists():
            return json.loads((folder / index).read_text())["weight_map"]
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (folder / single).exists():
            return {name: single for name in _names_in(folder / single)}
    return {}


def _open(path: Path):
    """A safetensors file's handle (its header read, the data memory mapped) or a .bin file's
    state dict (memory mapped); a damaged or truncated file is named with what to do."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            return safe_open(str(path), framework="pt")
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        from llmtrain.convert.mapping import ConversionError

        raise ConversionError(f"{path} cannot be read, it is damaged or truncated "
                              f"({path.stat().st_size} bytes; {error}): download or copy it "
                              f"again") from None


def _names_in(path: Path) -> list[str]:
    return list(_open(path).keys())


def missing_files(folder: Path) -> list[str]:
    """Names of the files a Hugging Face checkpoint folder lacks (empty: complete)."""
    if not folder.is_dir():
        return [f"{folder} (no such folder)"]
    missing = [] if (folder / CONFIG).exists() else [CONFIG]
    index = next((folder / i for i in WEIGHT_INDEXES if (folder / i).exists()), None)
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [s for s in shards if not (folder / s).exists()]
    elif not any((folder / s).exists() for s in (SAFE_SINGLE, BIN_SINGLE)):
        missing.append(f"{SAFE_SINGLE} (or {SAFE_INDEX} with its shards, or {BIN_SINGLE})")
    return missing


# The values of the 16 FP4 (e2m1) codes.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_PARTS = ("_blocks", "_scales")


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 as transformers stores it (the published gpt-oss experts): `blocks` [..., rows,
    groups, 16] bytes of two FP4 values each, the low nibble first, and `scales` [..., rows,
    groups] a power of two per group of 32, biased by 127 -> [..., rows, groups x 32] in bf16
    (exact: an FP4 value times a power of two)."""
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()
    values = torch.tensor(FP4_VALUES)[codes].reshape(*blocks.shape[:-1], 32)
    exponents = (scales.to(torch.int32) - 127)[..., None].float()
    return torch.ldexp(values, exponents).reshape(*blocks.shape[:-2], -1).to(torch.bfloat16)


class HFReader:
    """Reads a Hugging Face checkpoint's tensors by name, one at a time (safetensors are memory
    mapped, .bin files loaded lazily). Names are given with the model's prefix (`model.`,
    `transformer.`); checkpoints saved from the base model without it are read too. A tensor
    stored in MXFP4 (`<name>_blocks` and `<name>_scales`) is read as `<name>`, dequantized as
    transformers does: [..., groups x 32, rows], the transpose of its blocks' layout."""

    def __init__(self, folder: Path, base_prefix: str):
        self.folder = Path(folder)
        self.files: dict[str, tuple[str, str]] = {}
        for stored, file in weight_files(self.folder).items():
            name = stored
            if not stored.startswith(base_prefix) and not stored.startswith("lm_head."):
                name = base_prefix + stored
            self.files[name] = (file, stored)
        # {name: (its blocks' name, its scales' name)}
        self.mxfp4 = {name.removesuffix("_blocks"): (name, name.removesuffix("_blocks") + "_scales")
                      for name in self.files if name.endswith("_blocks")
                      and name.removesuffix("_blocks") + "_scales" in self.files}
        self._open: dict[str, object] = {}

    def names(self) -> list[str]:
        parts = {part for pair in self.mxfp4.values() for part in pair}
        return [name for name in self.files if name not in parts] + list(self.mxfp4)

    def read(self, name: str, index: Optional[int] = None) -> torch.Tensor:
        """The tensor `name`, or only its slice `index` along the first dimension (read alone
        from a safetensors file)."""
        if name in self.mxfp4:
            blocks, scales = (self.read(part, index) for part in self.mxfp4[name])
            return dequantize_mxfp4(blocks, scales).transpose(-1, -2)
        if name not in self.files:
            raise KeyError(f"{name} is not in the checkpoint at {self.folder}")
        file, stored = self.files[name]
        handle = self._handle(file)
        if not file.endswith(".safetensors"):
            return handle[stored] if index is None else handle[stored][index]
        return handle.get_tensor(stored) if index is None else handle.get_slice(stored)[index]

    def _handle(self, file: str):
        if file not in self._open:
            self._open[file] = _open(self.folder / file)
        return self._open[file]

    def shapes(self) -> dict[str, tuple[str, list[int]]]:
        """{name: (file, shape)} from the files' headers (every file opened, none read); an
        MXFP4 tensor's shape is the dequantized one."""
        result = {}
        for name, (file, stored) in self.files.items():
            handle = self._handle(file)
            shape = (handle.get_slice(stored).get_shape() if file.endswith(".safetensors")
                     else list(handle[stored].shape))
            result[name] = (file, list(shape))
        for name, (blocks, scales) in self.mxfp4.items():
            file, (*stack, rows, groups, _) = result.pop(blocks)
            del result[scales]
            result[name] = (file, [*stack, groups * 32, rows])
        return result

    def dtype(self) -> torch.dtype:
        """The floating-point format the checkpoint stores (of its first tensor)."""
        return self.read(self.names()[0]).dtype


class ShardWriter:
    """Writes tensors into safetensors files of at most `max_bytes` each, as they come; `close`
    returns {file: [tensor names]}. Files are named with `prefix`, renamed by `finish_index`."""

    def __init__(self, folder: Path, prefix: str, max_bytes: int):
        self.folder, self.prefix, self.max_bytes = Path(folder), prefix, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: dict[str, list[str]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        # A copy of its own: safetensors refuses tensors that share memory.
        self.pending[name] = tensor.detach().contiguous().clone()
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        file = f"{self.prefix}-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(self.folder / file), metadata={"format": "pt"})
        self.written[file] = list(self.pending)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict[str, list[str]]:
        if self.pending:
            self._flush()
        return self.written


LAYOUT = "hf_layout.safetensors"


def save_layout(source: Path, target: Path, base_prefix: str, is_buffer) -> None:
    """What a Hugging Face checkpoint holds beyond the weights, kept beside the Megatron one so
    that the way back writes the names and tensors it came with: names saved without the
    model's prefix (GPT-2 on the Hub), and buffers (GPT-2's attention masks, rotary inv_freq)."""
    from safetensors.torch import save_file

    reader = HFReader(source, base_prefix)
    without_prefix = any(name != stored for name, (_, stored) in reader.files.items())
    buffers = {stored: reader.read(name).contiguous() for name, (_, stored) in reader.files.items()
               if is_buffer(name) and not name.startswith("lm_head.")}
    if without_prefix or buffers:
        save_file(buffers, str(Path(target) / LAYOUT),
                  metadata={"without_prefix": str(without_prefix)})


def read_layout(folder: Path) -> tuple[bool, dict[str, torch.Tensor]]:
    """(names saved without the prefix, buffers) that `save_layout` kept in `folder`."""
    path = Path(folder) / LAYOUT
    if not path.exists():
        return False, {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata()["without_prefix"] == "True",
                {name: f.get_tensor(name) for name in f.keys()})


def finish_index(folder: Path, parts: list[dict[str, list[str]]]) -> list[str]:
    """Name the written files as transformers does (model.safetensors, or model-0000i-of-0000n
    with an index) in the order given; return the final file names."""
    files = [(file, names) for part in parts for file, names in part.items()]
    # safetensors writes files readable by their owner only; make them what the umask allows.
    umask = os.umask(0)
    os.umask(umask)
    for file, _ in files:
        os.chmod(folder / file, 0o666 & ~umask)
    if len(files) == 1:
        os.replace(folder / files[0][0], folder / SAFE_SINGLE)
        return [SAFE_SINGLE]
    weight_map, total, final = {}, 0, []
    for number, (file, names) in enumerate(files, start=1):
        name = f"model-{number:05d}-of-{len(files):05d}.safetensors"
        os.replace(folder / file, folder / name)
        final.append(name)
        total += (folder / name).stat().st_size
        weight_map.update({tensor: name for tensor in names})
    (folder / SAFE_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2) + "\n")
    return final


def side_files(folder: Path) -> list[Path]:
    """The files of a checkpoint folder other than weights: config, generation config,
    tokenizer, chat template, license, ..."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(WEIGHT_SUFFIXES) and p.name not in WEIGHT_INDEXES)


def copy_side_files(source: Path, target: Path, skip: tuple[str, ...] = ()) -> list[str]:
    copied = []
    for path in side_files(source):
        if path.name not in skip:
            shutil.copy2(path, Path(target) / path.name)
            copied.append(path.name)
    return copied


def has_tokenizer(folder: Optional[Path]) -> bool:
    return folder is not None and any((Path(folder) / f).exists() for f in TOKENIZER_FILES)
