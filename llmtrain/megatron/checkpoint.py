"""Megatron-Core distributed checkpoints that are complete or invisible, self-describing, verified.

Layout, as Megatron-LM writes it, so its users find their way around:

    <save>/iter_0000050/                    a complete step: dist_checkpointing's files, plus
        llmtrain.json                       the resolved config, tokenizer identity, parallel layout
        integrity.json                      SHA-256 of every file (Megatron-Core's manifest format)
    <save>/iter_0000060.incomplete/         a save in progress, or one that never finished
    <save>/latest_checkpointed_iteration.txt

A step is written into `iter_N.incomplete/` and renamed to `iter_N/` by rank 0 only after every
rank has finished writing and the manifest and descriptor are in place; the pointer file moves
after that. A rename within one directory is atomic, so whoever looks (a resuming run, a
converter) sees the whole step or none of it. Each rank's random-number states are saved as its
own shard, so dropout continues exactly; the model, optimizer and schedule state are resharded by
dist_checkpointing when the parallel layout changes. Every error of a save or a load is agreed on
by all ranks and raised as RunStopped with what happened and what to do; a failed save removes
its incomplete folder and leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, is_main_replica
from megatron.core.dist_checkpointing.validation import (INTEGRITY_FNAME,
                                                        StrictHandling)
from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE
from torch.distributed.checkpoint.api import CheckpointException

from llmtrain import __version__, faults
from llmtrain.config import changes
from llmtrain.config.layout import Layout
from llmtrain.config.schema import Config
from llmtrain.errors import RunStopped
from llmtrain.megatron import lora, lora_checkpoint, rng

TRACKER = "latest_checkpointed_iteration.txt"
DESCRIPTOR = "llmtrain.json"
INCOMPLETE = ".incomplete"
DELETING = ".deleting"
_STEP = re.compile(r"iter_(\d+)")
# Layout fields that fix which rank holds which random-number streams.
_RNG_LAYOUT = ("device", "tensor_model_parallel_size", "pipeline_model_parallel_size",
               "virtual_pipeline_model_parallel_size", "context_parallel_size",
               "expert_model_parallel_size", "data_parallel_size")
MIB = 1 << 20
NO_ROOM = "not enough free disk space"
# How the distributed optimizer lays out its state. "fully_reshardable" loads under any other
# TP/PP/DP layout (Megatron gathers each parameter's state once when saving); Megatron-Core
# 0.19.2 cannot load it back into torch's own Adam (no Transformer Engine or Apex: the CPU), where
# "dp_reshardable" is used, which allows changes of the data-parallel size only.
CONTENT_METADATA = {"distrib_optim_sharding_type":
                    "fully_reshardable" if HAVE_APEX_OR_TE else "dp_reshardable"}


def stop_writer_process() -> None:
    """Megatron's checkpoint writer starts a multiprocessing manager (for its results queue) that
    lives as long as the process: stopped and waited for when the worker ends, so that no process
    outlives the command."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._results_queue
    if queue is not None:
        queue._manager.shutdown()
        filesystem_async._results_queue = None


def step_dir(root: str | os.PathLike, iteration: int) -> Path:
    root = Path(root)
    if iteration == 0 and (root / "release").is_dir() and not (root / "iter_0000000").exists():
        return root / "release"  # Megatron-LM's name for a converted checkpoint
    return root / f"iter_{iteration:07d}"


def is_complete(folder: Path) -> bool:
    """Committed by llmtrain (its descriptor is inside) or written whole by Megatron-Core."""
    return (folder / DESCRIPTOR).is_file() or (folder / "metadata.json").is_file()


@dataclass
class Listing:
    """What a checkpoint folder holds."""

    complete: list[int] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)  # folder names
    tracker: Optional[str] = None

    def shown(self) -> str:
        return ", ".join(map(str, self.complete)) or "none"


def listing(root: str | os.PathLike) -> Listing:
    root = Path(root)
    result = Listing()
    if not root.is_dir():
        return result
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.endswith(DELETING):
            continue
        match = _STEP.fullmatch(entry.name)
        if (match or entry.name == "release") and is_complete(entry):
            result.complete.append(int(match.group(1)) if match else 0)
        elif entry.name.startswith("iter_"):
            result.incomplete.append(entry.name)
    result.complete.sort()
    if (root / TRACKER).is_file():
        result.tracker = (root / TRACKER).read_text().strip()
    return result


def latest_iteration(root: str | os.PathLike) -> Optional[int]:
    """The last complete checkpoint under `root`, or None."""
    steps = listing(root).complete
    return steps[-1] if steps else None


def unwrap(chunk):
    """The GPTModel inside DDP and mixed-precision wrappers (checkpoints hold its names)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _keys(model: list) -> list[str]:
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


def _model_state(model: list) -> dict:
    """Each chunk's sharded state, its replicas counted over the data-parallel group it was
    built with (the run's, or an alignment role's own: llmtrain.megatron.align.placement)."""
    state = {}
    for key, chunk in zip(_keys(model), model):
        inner = unwrap(chunk)
        state[key] = lora.saved_part(inner, inner.sharded_state_dict(
            metadata={"dp_cp_group": inner.pg_collection.dp_cp}))
    return state


def _merged(model_state: dict) -> dict:
    merged = {}
    for value in model_state.values():
        merged.update(value)
    return merged


def _rng_shard(state: Optional[dict]) -> ShardedObject:
    """This rank's random-number states: shard `rank` of `world size` (each rank writes its own)."""
    return ShardedObject("rng_state", state, (dist.get_world_size(),), (dist.get_rank(),),
                         replica_id=0)


def _bytes_to_write(state: dict) -> int:
    """Bytes of the tensors this rank writes (the main replica of each shard writes it)."""
    total = 0
    for value in nested_values(state):
        data = getattr(value, "data", None)
        if isinstance(data, torch.Tensor) and is_main_replica(getattr(value, "replica_id", 0)):
            total += data.numel() * data.element_size()
    return total


def _size(count: float) -> str:
    return f"{count / (1 << 30):.2f} GiB" if count >= 1 << 30 else f"{count / MIB:.0f} MiB"


# Collective helpers: every rank calls them at the same point and gets the same answer.

def _rank() -> int:
    return dist.get_rank()


def _broadcast(obj: Any, src: int = 0) -> Any:
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _gather(obj: Any) -> list:
    boxes = [None] * dist.get_world_size()
    dist.all_gather_object(boxes, obj)
    return boxes


def _first_error(error: Optional[str]) -> Optional[str]:
    """The error of the lowest rank that had one, on every rank."""
    errors = _gather(error)
    return next((f"rank {r}: {e}" if len(errors) > 1 else e
                 for r, e in enumerate(errors) if e), None)


class NotThisModel(RuntimeError):
    """A checkpoint written for another model (or a converted one without training state):
    earlier steps of the same folder would not fit either."""


class Damaged(Exception):
    """A step that cannot be loaded as it is on disk; `hint`: a way out when it was asked for."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message, self.hint = message, hint


def _short_files(folder: Path) -> list[str]:
    """Rank 0: the tensor files of a step shorter than its metadata says (truncated), found
    without the integrity manifest."""
    from torch.distributed.checkpoint import FileSystemReader

    needed: dict[str, int] = {}
    for info in FileSystemReader(str(folder)).read_metadata().storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0),
                                         info.offset + info.length)
    short = []
    for name, size in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            short.append(f"{name}: missing")
        elif path.stat().st_size < size:
            short.append(f"{name}: truncated ({path.stat().st_size:,} bytes; the checkpoint's "
                         f"metadata places data up to byte {size:,})")
    return short


# What a failed save or load may raise (torch's CheckpointException is a BaseException).
FAILURES = (Exception, CheckpointException)


def _text(exc: BaseException) -> str:
    """An exception as a user reads it (an OSError already names the file and the cause)."""
    if isinstance(exc, CheckpointException):
        ranks = sorted(exc.failures)
        causes = "; ".join(f"rank {rank}: {type(error).__name__}: {error}"
                           for rank, (error, _) in sorted(exc.failures.items()))
        return (f"the writers of rank(s) {', '.join(map(str, ranks))} failed ({causes}); a "
                f"failing writer logs its cause on its own rank" if ranks
                else "a writer on another rank failed")
    return str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"


def _on_rank0(work: Callable[[], Any]) -> tuple[Any, Optional[str]]:
    """Run `work` on rank 0; every rank gets its result and its error (as text), if any."""
    result, error = None, None
    if _rank() == 0:
        try:
            result = work()
        except FAILURES as exc:  # any failure here is reported as the save's or load's failure
            error = _text(exc)
    return _broadcast((result, error))


def _write_json(path: Path, content: dict) -> None:
    with open(path, "w") as handle:
        json.dump(content, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    """Collective: each rank hashes a share of the files, rank 0 writes integrity.json."""
    names = _broadcast(sorted(p.name for p in folder.iterdir() if p.is_file()
                              and p.name != INTEGRITY_FNAME) if _rank() == 0 else None)
    share = {name: _sha256(folder / name)
             for name in names[_rank()::dist.get_world_size()]}
    hashes = {}
    for part in _gather(share):
        hashes.update(part)
    if _rank() == 0:
        _write_json(folder / INTEGRITY_FNAME, {"algorithm": "sha256", "files": dict(sorted(
            hashes.items()))})


def _damaged_files(folder: Path) -> list[str]:
    """Collective: files that differ from integrity.json (an empty list when all match)."""
    def read_manifest():
        path = folder / INTEGRITY_FNAME
        return json.loads(path.read_text())["files"] if path.exists() else None

    manifest, error = _on_rank0(read_manifest)
    if error:
        return [f"{INTEGRITY_FNAME}: cannot be read ({error})"]
    if manifest is None:
        return []
    problems = []
    for name in sorted(manifest)[_rank()::dist.get_world_size()]:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif _sha256(path) != manifest[name]:
            problems.append(f"{name}: its content differs from the SHA-256 recorded when it was "
                            f"saved (the file is damaged or was changed)")
    return sorted(p for part in _gather(problems) for p in part)


def _remove(folder: Path) -> None:
    """Make a step invisible first (rename), then delete it."""
    doomed = folder.with_name(folder.name + DELETING)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe(cfg: Config, layout: Layout, tokenizer, iteration: int) -> dict:
    """The descriptor stored with each step (llmtrain.json)."""
    import megatron.core

    return {
        "iteration": iteration,
        "consumed_samples": iteration * cfg.stage.global_batch_size,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": _plain(dataclasses.asdict(cfg)),
        "tokenizer": tokenizer_identity(tokenizer),
        "layout": dataclasses.asdict(layout),
        "rng_states": True,
        "versions": {"llmtrain": __version__, "megatron_core": megatron.core.__version__,
                     "torch": torch.__version__},
        **lora_checkpoint.descriptor_entry(cfg),
    }


def tokenizer_identity(tokenizer) -> dict:
    return {"type": tokenizer.kind, "identity": tokenizer.identity,
            "vocab_size": tokenizer.vocab_size}


def _plain(value: Any) -> Any:
    """As JSON stores it (tuples become lists), so that stored and current configs compare."""
    return json.loads(json.dumps(value))


@dataclass
class Plan:
    """Which step a starting run loads (chosen on rank 0, shared with every rank)."""

    folder: Optional[Path] = None
    iteration: int = 0
    weights_only: bool = False
    descriptor: Optional[dict] = None
    notes: list[str] = field(default_factory=list)
    error: Optional[str] = None
    error_code: int = 1
    # Chosen as the latest step (not load_step): a damaged one gives way to an earlier one.
    automatic: bool = False


@dataclass
class Restored:
    """What a starting run got from its checkpoint: nothing, weights, or the whole state."""

    iteration: int = 0
    folder: Optional[Path] = None
    rng_state: Optional[dict] = None

    def restore_rng(self) -> None:
        """Call right before the first step (after the data loaders drew their seeds)."""
        if self.rng_state is not None:
            rng.restore(self.rng_state)


class Checkpoints:
    """Saving and loading for one run: atomic steps, retention, async saves, resume checks."""

    def __init__(self, cfg: Config, layout: Layout, tokenizer, save_dir: Optional[Path],
                 say: Callable[[str], None]):
        self.cfg, self.layout, self.tokenizer = cfg, layout, tokenizer
        self.root = save_dir
        self.say = say
        self.queue = None
        self.pending: Optional[int] = None  # the step of the async save in flight
        if cfg.checkpoint.async_save and save_dir is not None:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self.queue = AsyncCallsQueue(persistent=False)

    # Loading.

    def _plan(self) -> Plan:
        """Rank 0: the step to load, or the error that stops the run (no collectives here)."""
        ck = self.cfg.checkpoint
        # A LoRA run's checkpoint.load is its base model (llmtrain.megatron.transforms).
        load_dir = Path(ck.load) if ck.load and self.cfg.peft.name == "none" else None
        if ck.resume == "never":
            note = "checkpoint.resume=never: starting from fresh weights"
            existing = listing(self.root).complete if self.root else []
            if existing:
                note += (f"; {self.root} already holds steps {', '.join(map(str, existing))}, "
                         f"which saves of the same step replace")
            return Plan(notes=[note])
        if ck.load_step is not None:
            root = load_dir or self.root
            found = listing(root)
            if ck.load_step not in found.complete:
                state = ("is incomplete (a save that did not finish)"
                         if f"iter_{ck.load_step:07d}{INCOMPLETE}" in found.incomplete
                         or f"iter_{ck.load_step:07d}" in found.incomplete else "does not exist")
                return Plan(error=f"checkpoint.load_step={ck.load_step}: step {ck.load_step} in "
                            f"{root} {state}. Complete steps there: {found.shown()}. Choose one "
                            f"of them, or leave load_step unset to resume from the latest",
                            error_code=2)
            return self._planned(root, ck.load_step, found,
                                 weights_only=ck.finetune and root == load_dir)
        notes = []
        for root, weights_only in ((self.root, False), (load_dir, ck.finetune)):
            if root is None:
                continue
            found = listing(root)
            if found.complete:
                plan = self._planned(root, found.complete[-1], found, weights_only,
                                     automatic=True)
                plan.notes[:0] = notes
                return plan
            if found.incomplete:
                notes.append(f"warning: skipping {root}: it holds only incomplete checkpoints "
                             f"({', '.join(found.incomplete)})")
        return Plan(notes=notes)

    def _planned(self, root: Path, step: int, found: Listing, weights_only: bool,
                 automatic: bool = False) -> Plan:
        folder = step_dir(root, step)
        plan = Plan(folder=folder, iteration=step, weights_only=weights_only,
                    automatic=automatic)
        newer = [name for name in found.incomplete if _step_of(name) > step]
        if newer:
            plan.notes.append(f"warning: skipping incomplete checkpoint(s) {', '.join(newer)} "
                              f"in {root} (saves that did not finish)")
        # The pointer file should name the latest complete step (which a load_step may pass by).
        if found.tracker not in (None, "release", str(found.complete[-1])) and not newer:
            plan.notes.append(f"warning: {TRACKER} names step {found.tracker}, which is not the "
                              f"latest complete step; loading step {step}")
        path = folder / DESCRIPTOR
        if path.exists():
            try:
                plan.descriptor = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                plan.error = f"{path} cannot be read ({exc}): the checkpoint is damaged."
        else:
            plan.notes.append(f"{folder} has no {DESCRIPTOR} (a converted or Megatron-LM "
                              f"checkpoint): its config and tokenizer cannot be checked")
        return plan

    @staticmethod
    def _earlier(root: Path, step: int, found: Listing) -> str:
        earlier = [s for s in found.complete if s < step]
        if not earlier:
            return "No earlier complete step exists there."
        return (f"Load an earlier one with checkpoint.load_step={earlier[-1]} (complete steps "
                f"in {root}: {found.shown()}).")

    def _check_config(self, plan: Plan) -> None:
        """Refuse a resume whose config changed what is being trained; note what else changed."""
        stored = plan.descriptor
        if stored is None:
            return
        allowed = list(self.cfg.checkpoint.allow_config_change)
        current = {**_plain(dataclasses.asdict(self.cfg)),
                   "tokenizer": tokenizer_identity(self.tokenizer)}
        accepted, refused = changes.compare({**stored["config"], "tokenizer": stored["tokenizer"]},
                                            current, allowed, plan.weights_only)
        if refused:
            raise RunStopped(changes.refusal(str(plan.folder), refused, allowed), exit_code=2)
        noted = [str(c) for c in accepted if not any(changes.covers(q, c.key)
                                                      for q in changes.QUIET)]
        if noted:
            self.say("config changes since the checkpoint: " + "; ".join(noted))

    def restore(self, model: list, optimizer, scheduler) -> Restored:
        """Load what `checkpoint` says (collective); return where training continues. An
        automatic resume whose step is damaged falls back to the newest intact one before it,
        with a warning; a step asked for (load_step) is loaded or the run stops."""
        plan: Plan = _broadcast(self._plan() if _rank() == 0 else None)
        for note in plan.notes:
            self.say(note)
        while True:
            try:
                return self._restore(plan, model, optimizer, scheduler)
            except Damaged as damaged:
                root = plan.folder.parent
                found = listing(root)
                earlier = [s for s in found.complete if s < plan.iteration]
                if not plan.automatic or not earlier:
                    way_out = self._earlier(root, plan.iteration, found)
                    raise RunStopped(f"{damaged.message}\n  {way_out}{damaged.hint}") from None
                self.say(f"warning: {damaged.message}\n  Falling back to the newest intact step "
                         f"before it, {earlier[-1]}")
                plan = _broadcast(self._planned(root, earlier[-1], found, plan.weights_only,
                                                automatic=True) if _rank() == 0 else None)

    def _restore(self, plan: Plan, model: list, optimizer, scheduler) -> Restored:
        """Load the planned step, or raise Damaged naming what is wrong with it."""
        if plan.error and plan.error_code == 2:
            raise RunStopped(plan.error, exit_code=2)
        if plan.error:
            raise Damaged(plan.error)
        if plan.folder is None:
            return Restored()
        self._check_config(plan)
        lora_checkpoint.check_base(self.cfg, plan.descriptor, plan.folder)
        folder = plan.folder
        if self.cfg.checkpoint.verify_integrity:
            damaged = _damaged_files(folder)
            if damaged:
                raise Damaged(f"checkpoint {folder} is damaged:\n" + "\n".join(
                    f"    {d}" for d in damaged), " Or set checkpoint.verify_integrity=false to "
                    "load it anyway.")
        stored_layout = (plan.descriptor or {}).get("layout", {})
        same_layout = all(stored_layout.get(k) == getattr(self.layout, k) for k in _RNG_LAYOUT)
        with_rng = (not plan.weights_only and same_layout
                    and (plan.descriptor or {}).get("rng_states", False))
        if stored_layout and not same_layout:
            self.say(f"the checkpoint was saved under {_layout(stored_layout)}; resharding to "
                     f"{_layout(dataclasses.asdict(self.layout))}. Random-number streams "
                     f"(dropout) restart from the seed")
        try:
            common = load(folder.parent, plan.iteration, model, optimizer, scheduler,
                          plan.weights_only, with_rng)
        except (RunStopped, NotThisModel) as exc:
            if isinstance(exc, RunStopped):
                raise
            raise RunStopped(f"loading {folder} failed: {exc}") from None
        except FAILURES as exc:
            short, _ = _on_rank0(partial(_short_files, folder))
            named = "".join(f"\n    {name}" for name in short or [])
            raise Damaged(f"loading {folder} failed: {_text(exc)}"
                          + (f"\n  damaged file(s):{named}" if named else "")) from None
        start = 0 if plan.weights_only else int(common["iteration"])
        self.say(f"loaded {folder}" + (" (weights only: a new schedule starts)"
                                       if plan.weights_only else f"; resuming after step {start}"))
        return Restored(start, folder, common.get("rng_state") if with_rng else None)

    # Saving.

    def save(self, iteration: int, model: list, optimizer, scheduler,
             blocking: bool = False) -> None:
        """Save step `iteration` (collective). With checkpoint.async_save the files are written
        in the background unless `blocking`; `poll` and `wait` commit the step."""
        self.wait()
        began = time.perf_counter()
        state = _state(model, optimizer, scheduler, iteration, {
            "consumed_samples": iteration * self.cfg.stage.global_batch_size,
            "rng_state": _rng_shard(rng.capture())})
        background = self.queue is not None and not blocking
        request = _start(self.root, iteration, state, background, self.layout.device)
        commit = partial(self._commit, iteration, began)
        if not background:
            commit()
            return
        if faults.save_fault(iteration, _rank()) == "crash":
            request = request._replace(async_fn=faults.crashing_writer(iteration))
        request.add_finalize_fn(commit)
        self.queue.schedule_async_request(request)
        self.pending = iteration

    def _commit(self, iteration: int, began: float) -> None:
        """Collective, once every rank's files are written."""
        ck = self.cfg.checkpoint
        _finish(self.root, iteration, describe(self.cfg, self.layout, self.tokenizer, iteration),
                ck.verify_integrity)
        self.pending = None
        removed, error = _on_rank0(partial(_retain, self.root, ck.keep_last, ck.keep_every,
                                           iteration))
        note = f"; removed {', '.join(removed)}" if removed else ""
        if error:
            note = f"; warning: old checkpoints could not be removed ({error})"
        self.say(f"saved {step_dir(self.root, iteration)} in "
                 f"{time.perf_counter() - began:.1f} s{note}")

    def poll(self) -> None:
        """At a step boundary (collective): commit a background save whose writers finished."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Collective: commit the background save in flight, waiting for its writers."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if self.queue is None or self.pending is None:
            return
        iteration = self.pending
        try:
            self.queue.maybe_finalize_async_calls(blocking=blocking)
        except RunStopped:
            raise
        except FAILURES as exc:  # a writer failed: dist_checkpointing raises it on every rank
            self.pending = None
            _fail(self.root, iteration, _text(exc))


# The steps of a save, shared by training (Checkpoints) and the converter (`save`).

def _state(model: list, optimizer, scheduler, iteration: int, extra: dict) -> dict:
    state = _model_state(model)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(_merged(state),
                                                          metadata=CONTENT_METADATA)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state.update(extra)
    return state


def _temp_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}{INCOMPLETE}"


def _start(root: Path, iteration: int, state: dict, background: bool, device: str):
    """Collective: room for the step, a fresh temporary folder, then its files written (or, in
    the background, their writers prepared: the returned request)."""
    size = torch.tensor([_bytes_to_write(state)], dtype=torch.float64, device=device)
    dist.all_reduce(size)
    _, error = _on_rank0(partial(_prepare, _temp_dir(root, iteration), float(size.item())))
    if error:
        _fail(root, iteration, error)
    request, error = None, None
    try:
        request = dist_checkpointing.save(state, str(_temp_dir(root, iteration)),
                                          async_sharded_save=background, async_strategy="mcore",
                                          content_metadata=CONTENT_METADATA)
    except FAILURES as exc:
        error = _text(exc)
    error = _first_error(error)
    if error:
        _fail(root, iteration, error)
    return request


def _prepare(temp: Path, size: float) -> None:
    """Rank 0, before anything is written: room for the step, and a clean temporary folder."""
    root = temp.parent
    root.mkdir(parents=True, exist_ok=True)
    if temp.exists():
        shutil.rmtree(temp)
    free = shutil.disk_usage(root).free
    needed = size * 1.05 + 16 * MIB
    if free < needed:
        raise OSError(f"{NO_ROOM} in {root}: the checkpoint needs about "
                      f"{_size(needed)} and {_size(free)} are free")
    temp.mkdir()


def _finish(root: Path, iteration: int, descriptor: Optional[dict], verify: bool) -> None:
    """Collective, once every rank's files are written: descriptor, manifest, then visible."""
    temp = _temp_dir(root, iteration)
    error = None
    try:
        faults.during_save(iteration, _rank())
    except FAILURES as exc:
        error = _text(exc)
    error = _first_error(error)
    if not error and descriptor is not None:
        _, error = _on_rank0(lambda: _write_json(temp / DESCRIPTOR, descriptor))
    if not error and verify:
        try:
            _write_manifest(temp)
        except OSError as exc:
            error = _text(exc)
        error = _first_error(error)
    if not error:
        _, error = _on_rank0(partial(_publish, root, iteration, temp))
    if error:
        _fail(root, iteration, error)


def _publish(root: Path, iteration: int, temp: Path) -> None:
    """Rank 0: make the step visible (one rename), then move the pointer file."""
    folder = step_dir(root, iteration)
    if folder.exists():  # an older save of the same step (resume=never, load_step)
        _remove(folder)
    os.replace(temp, folder)
    tracker = root / f".{TRACKER}.tmp"
    tracker.write_text(str(iteration))
    os.replace(tracker, root / TRACKER)
    _fsync_dir(root)


def _retain(root: Path, keep_last: Optional[int], keep_every: Optional[int],
            just_saved: int) -> list[str]:
    """Rank 0: delete steps that keep_last / keep_every let go, and leftovers of failed saves."""
    removed = []
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and entry.name.startswith("iter_") and (
                entry.name.endswith(INCOMPLETE) or entry.name.endswith(DELETING)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    if keep_last:
        steps = listing(root).complete
        keep = set(steps[-keep_last:]) | {just_saved}
        keep |= {s for s in steps if keep_every and s % keep_every == 0}
        for step in steps:
            if step not in keep:
                _remove(step_dir(root, step))
                removed.append(f"iter_{step:07d}")
    return removed


def _out_of_space(root: Path, error: str) -> Optional[str]:
    """Why a save failed when its file system is full: Megatron-Core's writers report an
    ENOSPC as just "<class 'OSError'>", so the file system is looked at (before the incomplete
    step is removed)."""
    try:
        stats = os.statvfs(root)
    except OSError:
        return None
    free, inodes = stats.f_bavail * stats.f_frsize, stats.f_favail
    if error.startswith(NO_ROOM):
        return None  # refused before writing: the message has the figures
    if "[Errno 28]" in error or inodes == 0 or free < 256 * MIB:
        return (f"no space left on device in {root} ({_size(free)} and {inodes:,} file(s) free "
                f"there; the writer said: {error})")
    return None


def _fail(root: Path, iteration: int, error: str) -> NoReturn:
    """Every rank: drop the incomplete folder, say what happened and what is left, stop."""
    error = _out_of_space(root, error) or error
    if _rank() == 0:
        shutil.rmtree(_temp_dir(root, iteration), ignore_errors=True)
    earlier = [s for s in listing(root).complete if s != iteration]
    intact = (f"the previous checkpoint, {step_dir(root, earlier[-1])}, is intact" if earlier
              else "no earlier checkpoint exists")
    raise RunStopped(f"saving step {iteration} failed: {error}\n  Nothing of step {iteration} "
                     f"was kept; {intact}. Fix the cause (free disk space, permissions), then "
                     f"run the same command to resume.")


def _materialize_optimizer_state(optimizer) -> None:
    """torch's Adam creates its state at its first step, but Megatron's distributed optimizer
    reads that state (its step count) to build what it loads into: take one step of zero
    gradients first. Whatever it changes is overwritten by the load."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def save(root: str | os.PathLike, iteration: int, model: list, optimizer, scheduler,
         common: dict[str, Any]) -> Path:
    """Write step `iteration` collectively, synchronously and atomically, with its manifest
    (optimizer and scheduler may be None: the converter's weights-only steps). Training saves
    through Checkpoints, which adds RNG states, the descriptor, retention and async writes."""
    root = Path(root)
    state = _state(model, optimizer, scheduler, iteration, common)
    _start(root, iteration, state, False, "cuda" if torch.cuda.is_initialized() else "cpu")
    _finish(root, iteration, None, verify=True)
    return step_dir(root, iteration)


def has_training_state(source: str | os.PathLike) -> bool:
    """Whether a checkpoint folder holds optimizer and schedule state (converted ones do not)."""
    return "scheduler" in dist_checkpointing.load_common_state_dict(str(source))


# Transformer Engine's per-module FP8 metadata: absent from checkpoints written by Megatron's local
# layers (CPU runs, conversions) and rebuilt by TE at its first step, so a weights-only load may
# go without it.
_REBUILT = "_extra_state"
# Scalar heads that alignment stages put on a language model (reward model, critic): loading a
# language model's weights into such a model leaves them as initialised.
HEADS = "scalar_head."


def load(root: str | os.PathLike, iteration: int, model: list, optimizer, scheduler,
         weights_only: bool = False, with_rng: bool = False) -> dict[str, Any]:
    """Load step `iteration` into the given objects (collective); return the common state
    (with this rank's `rng_state` when asked for: apply it with `rng.restore`)."""
    source = step_dir(root, iteration)
    state = _model_state(model)
    if weights_only:
        loaded, _, absent = dist_checkpointing.load(state, str(source),
                                                    strict=StrictHandling.RETURN_UNEXPECTED)
        lacking = sorted(k for k in absent if _REBUILT not in k and HEADS not in k)
        if lacking:
            raise NotThisModel(f"{source} lacks {len(lacking)} tensor(s) of this model, e.g. "
                               f"{', '.join(lacking[:5])}: was it written for another model= ?")
    else:
        if not has_training_state(source):
            raise NotThisModel(f"{source} holds weights only (a converted model): add "
                               f"checkpoint.finetune=true to start training from it")
        _materialize_optimizer_state(optimizer)
        metadata = dist_checkpointing.load_content_metadata(str(source)) or CONTENT_METADATA
        state["optimizer"] = optimizer.sharded_state_dict(_merged(state), is_loading=True,
                                                          metadata=metadata)
        if with_rng:
            state["rng_state"] = _rng_shard(None)
        loaded = dist_checkpointing.load(state, str(source))
    for key, chunk in zip(_keys(model), model):
        missing, unexpected = unwrap(chunk).load_state_dict(loaded.pop(key), strict=False)
        wrong = [k for k in missing if _REBUILT not in k and not lora.in_base(unwrap(chunk), k)
                 and not (weights_only and k.startswith(HEADS))] + list(unexpected)
        if wrong:
            raise NotThisModel(f"{source} does not match this model: {', '.join(wrong[:5])}; give "
                           f"the model= it was written for")
    if not weights_only:
        optimizer.load_state_dict(loaded.pop("optimizer"))
        scheduler.load_state_dict(loaded.pop("scheduler"))
    else:
        loaded.pop("optimizer", None)
        loaded.pop("scheduler", None)
        if optimizer is not None:
            # bf16/fp16: the optimizer's fp32 main weights were copied from the initialised model
            # when it was built; without this its first step writes them back over the loaded
            # weights (a fine-tune from a converted model silently trained from the seed's).
            optimizer.reload_model_params()
    dist.barrier()
    return loaded


def stored_tensors(source: str | os.PathLike) -> dict[str, tuple[list[int], torch.dtype]]:
    """{key: (whole shape, dtype)} of the tensors a checkpoint folder holds, read from its
    metadata only."""
    metadata = dist_checkpointing.load_tensors_metadata(str(source))
    return {key: (list(t.global_shape), t.dtype) for key, t in metadata.items()}


def _step_of(name: str) -> int:
    match = re.match(r"iter_(\d+)", name)
    return int(match.group(1)) if match else -1


def _layout(layout: dict) -> str:
    return (f"TP {layout.get('tensor_model_parallel_size')} PP "
            f"{layout.get('pipeline_model_parallel_size')} CP "
            f"{layout.get('context_parallel_size')} EP {layout.get('expert_model_parallel_size')} "
            f"DP {layout.get('data_parallel_size')} on {layout.get('device')}")
