"""Runs that die, get preempted, diverge or meet a full disk, as a user meets them.

Every test runs the real command on the tiny model (with dropout, so that exact resume needs the
random-number states) and checks what a user would check: exit status, messages, the checkpoint
folder, and losses against a run that was never interrupted (bitwise: same process count, CPU).
Faults that cannot be caused from outside at a chosen moment are injected through the documented
LLMTRAIN_FAULT_* variables (llmtrain/faults.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import FAST, ROOT, run_llmtrain, summary
from llmtrain.launch import REQUEUE_EXIT_CODE

# Dropout on, and a schedule that does not depend on train_iters.
ARGS = [*FAST, "model.hidden_dropout=0.1", "optim.lr_decay_iters=12", "logging.tensorboard=false"]
RUN12 = [*ARGS, "stage.train_iters=12", "checkpoint.save_interval=4"]


class Run:
    """`python -m llmtrain ...` in the background, its output read line by line as it comes."""

    def __init__(self, *args: str, env: dict | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llmtrain", *args], cwd=ROOT, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern!r} in time:\n{self.output}")
            if line is None:
                raise AssertionError(f"the run ended before {pattern!r}:\n{self.output}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def crash(self) -> None:
        """The machine dies: SIGKILL to the run and every process it started (background
        checkpoint writers included), as when a node is lost."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def finish(self, timeout: float = 600) -> int:
        code = self.process.wait(timeout)
        while (line := self.lines.get(timeout=60)) is not None:
            self.seen.append(line)
        return code

    @property
    def output(self) -> str:
        return "".join(self.seen)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def checkpoint_steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())


def tracker(run_dir: Path) -> str:
    return (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text()


def intact(folder: Path) -> bool:
    """Every file still has the SHA-256 recorded when the step was saved."""
    manifest = json.loads((folder / "integrity.json").read_text())["files"]
    return all(hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
               for name, digest in manifest.items())


def tensors(folder: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors of a saved step, read with torch's own DCP reader."""
    out = tmp_path / f"{folder.parent.parent.name}-{folder.name}.pt"
    dcp_to_torch_save(folder, out)
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Twelve steps that were never interrupted, saved every 4 steps."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_llmtrain(*RUN12, f"hydra.run.dir={run_dir}")
    return run_dir


def test_sigkill_at_a_random_step_then_the_same_command_continues_exactly(reference, tmp_path):
    kill_after = random.randint(5, 11)
    with Run(*RUN12, f"hydra.run.dir={tmp_path}") as run:
        run.wait_for(rf"^step +{kill_after}/12 ")
        run.crash()
    out = run_llmtrain(*RUN12, f"hydra.run.dir={tmp_path}").stdout
    start = summary(tmp_path)["start_step"]
    # The latest complete checkpoint at the kill (the save of a multiple of 4 may have been cut).
    assert start in (kill_after // 4 * 4, kill_after // 4 * 4 - 4), (kill_after, out)
    assert f"resuming after step {start}" in out
    assert summary(tmp_path)["losses"] == summary(reference)["losses"][start:], kill_after


def test_another_runs_middle_step_resumes_exactly_in_a_new_folder(reference, tmp_path):
    """What docs/reliability.md's GPU measurement does: a new run continues the reference from
    its step 4 (checkpoint.load + load_step), without copying it, and says nothing of the
    pointer file, which rightly names the reference's latest step."""
    out = run_llmtrain(*RUN12, f"checkpoint.load={reference / 'checkpoints'}",
                       "checkpoint.load_step=4", "checkpoint.save=null",
                       f"hydra.run.dir={tmp_path}")
    assert "resuming after step 4" in out.stdout
    assert "latest_checkpointed_iteration.txt names" not in out.stdout + out.stderr
    assert summary(tmp_path)["losses"] == summary(reference)["losses"][4:]


def test_a_save_killed_midway_stays_invisible_and_is_skipped_on_resume(reference, tmp_path):
    ckpt = tmp_path / "checkpoints"
    with Run(*RUN12, f"hydra.run.dir={tmp_path}", env={"LLMTRAIN_FAULT_SAVE": "stall@8"}) as run:
        run.wait_for("the save of step 8 stalls")
        run.crash()
    # Step 8's data files are written, but it was never committed: invisible.
    assert (ckpt / "iter_0000008.incomplete" / "__0_0.distcp").exists()
    assert checkpoint_steps(tmp_path) == ["iter_0000004", "iter_0000008.incomplete"]
    assert tracker(tmp_path) == "4"

    out = run_llmtrain(*RUN12, f"hydra.run.dir={tmp_path}").stdout
    assert "warning: skipping incomplete checkpoint(s) iter_0000008.incomplete" in out
    assert "resuming after step 4" in out
    assert summary(tmp_path)["losses"] == summary(reference)["losses"][4:]
    # The next successful save cleared the leftover.
    assert checkpoint_steps(tmp_path) == ["iter_0000004", "iter_0000008", "iter_0000012"]


def test_sigterm_saves_at_the_next_step_boundary_and_exits_for_requeue(reference, tmp_path):
    with Run(*RUN12, f"hydra.run.dir={tmp_path}") as run:
        run.wait_for(r"^step +5/12 ")
        run.process.send_signal(signal.SIGTERM)
        code = run.finish()
    stopped = summary(tmp_path)["preempted_after_step"]
    assert code == REQUEUE_EXIT_CODE == 3, run.output
    assert stopped in (5, 6)  # the step in flight finishes: at most one step is lost
    assert (f"SIGTERM received: stopped after step {stopped}, saved step {stopped}; exit status "
            f"3 asks for a requeue" in run.output)
    assert tracker(tmp_path) == str(stopped)
    assert intact(tmp_path / "checkpoints" / f"iter_{stopped:07d}")

    out = run_llmtrain(*RUN12, f"hydra.run.dir={tmp_path}").stdout
    assert f"resuming after step {stopped}" in out
    assert summary(tmp_path)["losses"] == summary(reference)["losses"][stopped:]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signal_to_the_launcher_of_two_workers_saves_and_exits_with_3(tmp_path, sig):
    """The launcher process passes the signal on to its workers, which agree on one step (torch
    elastic would tear them down on SIGTERM if it handled it itself)."""
    args = [*ARGS, "stage.train_iters=12", "checkpoint.save_interval=0",
            "parallel.data_parallel_size=2", f"hydra.run.dir={tmp_path}"]
    with Run(*args) as run:
        run.wait_for(r"^step +3/12 ")
        run.process.send_signal(sig)
        code = run.finish()
    stopped = summary(tmp_path)["preempted_after_step"]
    assert code == REQUEUE_EXIT_CODE, run.output
    assert stopped in (3, 4)
    assert f"{sig.name} received: stopped after step {stopped}, saved step {stopped}" in run.output
    assert checkpoint_steps(tmp_path) == [f"iter_{stopped:07d}"]
    descriptor = json.loads((tmp_path / "checkpoints" / f"iter_{stopped:07d}" /
                             "llmtrain.json").read_text())
    assert descriptor["layout"]["data_parallel_size"] == 2


def test_nan_gradient_stops_before_the_update_naming_step_rank_and_value(tmp_path):
    out = run_llmtrain(*ARGS, "stage.train_iters=5", "checkpoint.save_interval=2",
                       f"hydra.run.dir={tmp_path}", check=False,
                       env={"LLMTRAIN_FAULT_NAN": "grad@3"})
    assert out.returncode == 1
    assert re.search(r"llmtrain: step 3: a gradient is not finite on rank 0: \S+ holds 1 "
                     r"non-finite value\(s\), the first nan \(pipeline stage 0, tensor-parallel "
                     r"rank 0, data-parallel rank 0\)\. Stopped before the weight update",
                     out.stderr), out.stderr
    assert "Traceback" not in out.stderr
    assert checkpoint_steps(tmp_path) == ["iter_0000002"]


def test_nan_loss_skipped_by_config_leaves_weights_and_optimizer_untouched(tmp_path):
    out = run_llmtrain(*ARGS, "stage.train_iters=3", "checkpoint.save_interval=1",
                       "optim.on_nonfinite=skip", f"hydra.run.dir={tmp_path}",
                       env={"LLMTRAIN_FAULT_NAN": "loss@3"}).stdout
    assert ("warning: step 3: the loss is nan on rank 0 (pipeline stage 0, tensor-parallel rank "
            "0, data-parallel rank 0); the step is skipped: no weight update") in out
    assert re.search(r"step +3/3 \| loss nan .*\| skipped", out)
    ckpt = tmp_path / "checkpoints"
    step1, step2, step3 = (tensors(ckpt / f"iter_{s:07d}", tmp_path) for s in (1, 2, 3))
    assert any(not torch.equal(step1[k], step2[k]) for k in step1)  # a normal step updates
    assert all(torch.equal(step2[k], step3[k]) for k in step2)  # the skipped one did not
    # summary.json stays strict JSON: the skipped step's loss is null, not NaN.
    strict = json.loads((tmp_path / "summary.json").read_text(),
                        parse_constant=lambda name: pytest.fail(f"summary.json holds {name}"))
    assert strict["losses"][-1] is None and strict["final_loss"] is None


def _mount_namespace() -> list[str]:
    """A command prefix that runs as root of a private mount namespace (its mounts vanish with
    it), or a skip where this machine allows neither root nor user namespaces."""
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    if shutil.which("unshare") is None or probe.returncode != 0:
        pytest.skip("mounting a small file system needs root or user namespaces (unshare -rm)")
    return prefix


def _in_namespace(prefix: list[str], setup: str, *args: str) -> subprocess.CompletedProcess:
    command = " ".join([sys.executable, "-m", "llmtrain", *(f"'{a}'" for a in args)])
    return subprocess.run([*prefix, "bash", "-c", f"set -e; {setup}; {command}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_full_disk_refuses_the_save_and_keeps_the_previous_checkpoint(tmp_path):
    """A 100 MiB file system holds one checkpoint of the tiny model (58 MiB), not two."""
    prefix = _mount_namespace()
    ckpt, copy = tmp_path / "checkpoints", tmp_path / "after"
    ckpt.mkdir()
    copy.mkdir()
    done = _in_namespace(prefix, f"mount -t tmpfs -o size=100m tmpfs {ckpt}; "
                         f"trap 'cp -a {ckpt}/. {copy}/' EXIT", *ARGS, "stage.train_iters=4",
                         "checkpoint.save_interval=2", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"llmtrain: saving step 4 failed: not enough free disk space in \S+: the "
                     r"checkpoint needs about \d+ MiB and \d+ MiB are free\n  Nothing of step 4 "
                     r"was kept; the previous checkpoint, \S+iter_0000002, is intact",
                     done.stderr), done.stderr
    assert sorted(p.name for p in copy.iterdir()) == [
        "iter_0000002", "latest_checkpointed_iteration.txt"]
    assert intact(copy / "iter_0000002")


def test_a_real_enospc_during_a_save_says_no_space_left_and_where(tmp_path):
    """A file system out of inodes: the writers' ENOSPC, which Megatron-Core reports as
    "<class 'OSError'>" only."""
    prefix = _mount_namespace()
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    done = _in_namespace(prefix, f"mount -t tmpfs -o size=200m,nr_inodes=2 tmpfs {ckpt}",
                         *ARGS, "stage.train_iters=1", "optim.lr_warmup_iters=0",
                         "checkpoint.save_interval=1", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(rf"llmtrain: saving step 1 failed: no space left on device in {ckpt} "
                     rf"\(\d+ MiB and 0 file\(s\) free there; the writer said: ", done.stderr), \
        done.stderr


def test_a_read_only_folder_fails_the_save_and_keeps_the_previous_checkpoint(tmp_path):
    prefix = _mount_namespace()
    ckpt = tmp_path / "checkpoints"
    run_llmtrain(*ARGS, "stage.train_iters=2", f"hydra.run.dir={tmp_path}")
    done = _in_namespace(prefix, f"mount --bind {ckpt} {ckpt}; mount -o remount,ro,bind {ckpt}",
                         *ARGS, "stage.train_iters=4", "checkpoint.save_interval=2",
                         f"hydra.run.dir={tmp_path}")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "resuming after step 2" in done.stdout
    assert (f"llmtrain: saving step 4 failed: [Errno 30] Read-only file system: "
            f"'{ckpt}/iter_0000004.incomplete'") in done.stderr, done.stderr
    assert f"the previous checkpoint, {ckpt}/iter_0000002, is intact" in done.stderr
    assert checkpoint_steps(tmp_path) == ["iter_0000002"]
    assert tracker(tmp_path) == "2"
    assert intact(ckpt / "iter_0000002")


def test_a_crash_after_writing_reports_it_and_removes_the_incomplete_step(tmp_path):
    out = run_llmtrain(*ARGS, "stage.train_iters=4", "checkpoint.save_interval=2",
                       f"hydra.run.dir={tmp_path}", check=False,
                       env={"LLMTRAIN_FAULT_SAVE": "crash@4"})
    assert out.returncode == 1
    assert ("llmtrain: saving step 4 failed: injected fault (LLMTRAIN_FAULT_SAVE) while saving "
            "step 4") in out.stderr, out.stderr
    assert checkpoint_steps(tmp_path) == ["iter_0000002"]
    assert tracker(tmp_path) == "2"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A finished two-step run with a checkpoint after each step."""
    run_dir = tmp_path_factory.mktemp("saved")
    run_llmtrain(*ARGS, "stage.train_iters=2", "checkpoint.save_interval=1",
                 f"hydra.run.dir={run_dir}")
    return run_dir


def test_a_wider_model_is_refused_with_the_diff_and_the_override(saved):
    out = run_llmtrain(*ARGS, "stage.train_iters=4", "model.hidden_size=320",
                       "optim.lr=5e-4", f"hydra.run.dir={saved}", check=False)
    assert out.returncode == 2
    assert (f"llmtrain: cannot resume from {saved}/checkpoints/iter_0000002: the configuration "
            f"differs from the checkpoint's in what is being trained (checkpoint -> now):\n"
            f"    model.hidden_size: 256 -> 320\n") in out.stderr, out.stderr
    assert "optim.lr" not in out.stderr  # may change without being named
    assert "checkpoint.allow_config_change=[model.hidden_size]" in out.stderr


def test_another_tokenizer_is_refused(saved, tmp_path):
    from llmtrain.data.corpus import corpus_tokenizer_path

    # The corpus tokenizer less its last merge: another tokenizer with 4095 tokens.
    spec = json.loads(corpus_tokenizer_path().read_text())
    first, second = spec["model"]["merges"].pop()
    del spec["model"]["vocab"][first + second]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    out = run_llmtrain(*ARGS, "stage.train_iters=4", "data.tokenizer.tokenizer_type=huggingface",
                       f"data.tokenizer.tokenizer_model={tmp_path / 'tokenizer.json'}",
                       f"hydra.run.dir={saved}", check=False)
    assert out.returncode == 2
    assert re.search(r"    tokenizer\.identity: [0-9a-f]{16} -> [0-9a-f]{16}\n", out.stderr)
    assert "    tokenizer.vocab_size: 4096 -> 4095\n" in out.stderr, out.stderr
    assert ("checkpoint.allow_config_change=[data.tokenizer.tokenizer_type,tokenizer]"
            in out.stderr), out.stderr


def test_a_damaged_file_is_named_with_the_way_out(saved, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved / "checkpoints", run_dir / "checkpoints")
    data = run_dir / "checkpoints" / "iter_0000002" / "__0_0.distcp"
    with open(data, "r+b") as handle:  # one flipped byte in the middle of the tensors
        handle.seek(data.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, 1)
        handle.write(bytes([byte[0] ^ 0xFF]))
    damaged = (f"checkpoint {run_dir}/checkpoints/iter_0000002 is damaged:\n    __0_0.distcp: "
               f"its content differs from the SHA-256 recorded when it was saved")
    # Asked for by its step: loaded or stopped, never replaced by another.
    out = run_llmtrain(*ARGS, "stage.train_iters=3", "checkpoint.load_step=2",
                       f"hydra.run.dir={run_dir}", check=False)
    assert out.returncode == 1
    assert f"llmtrain: {damaged}" in out.stderr, out.stderr
    assert "Load an earlier one with checkpoint.load_step=1" in out.stderr
    # An automatic resume (a requeue loop) says what is wrong and goes on from step 1.
    out = run_llmtrain(*ARGS, "stage.train_iters=3", f"hydra.run.dir={run_dir}")
    assert f"warning: {damaged}" in out.stdout, out.stdout
    assert "Falling back to the newest intact step before it, 1" in out.stdout
    assert f"loaded {run_dir}/checkpoints/iter_0000001; resuming after step 1" in out.stdout
    assert summary(run_dir)["start_step"] == 1


def test_a_truncated_file_without_the_manifest_is_named(saved, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved / "checkpoints", run_dir / "checkpoints")
    step = run_dir / "checkpoints" / "iter_0000002"
    (step / "integrity.json").unlink()
    data = step / "__0_0.distcp"
    os.truncate(data, data.stat().st_size // 2)  # as a copy that stopped halfway
    out = run_llmtrain(*ARGS, "stage.train_iters=3", "checkpoint.load_step=2",
                       f"hydra.run.dir={run_dir}", check=False)
    assert out.returncode == 1
    assert f"llmtrain: loading {step} failed: " in out.stderr, out.stderr
    assert re.search(r"damaged file\(s\):\n    __0_0\.distcp: truncated \([0-9,]+ bytes; the "
                     r"checkpoint's metadata places data up to byte [0-9,]+\)", out.stderr)


def test_loading_an_incomplete_step_lists_the_complete_ones(saved, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(saved / "checkpoints", run_dir / "checkpoints")
    (run_dir / "checkpoints" / "iter_0000003.incomplete").mkdir()
    out = run_llmtrain(*ARGS, "stage.train_iters=4", "checkpoint.load_step=3",
                       f"hydra.run.dir={run_dir}", check=False)
    assert out.returncode == 2
    assert (f"llmtrain: checkpoint.load_step=3: step 3 in {run_dir}/checkpoints is incomplete "
            f"(a save that did not finish). Complete steps there: 1, 2.") in out.stderr


def test_async_saves_keep_last_and_every_and_match_synchronous_ones(reference, tmp_path):
    out = run_llmtrain(*ARGS, "stage.train_iters=12", "checkpoint.save_interval=2",
                       "checkpoint.async_save=true", "checkpoint.keep_last=1",
                       "checkpoint.keep_every=4", f"hydra.run.dir={tmp_path}").stdout
    assert summary(tmp_path)["losses"] == summary(reference)["losses"]
    assert checkpoint_steps(tmp_path) == ["iter_0000004", "iter_0000008", "iter_0000012"]
    assert "removed iter_0000010" in out
    ours = tensors(tmp_path / "checkpoints" / "iter_0000008", tmp_path)
    theirs = tensors(reference / "checkpoints" / "iter_0000008", tmp_path)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_background_writer_failure_on_rank_1_reaches_rank_0(tmp_path):
    out = run_llmtrain(*ARGS, "stage.train_iters=4", "checkpoint.save_interval=2",
                       "checkpoint.async_save=true", "parallel.data_parallel_size=2",
                       f"hydra.run.dir={tmp_path}", check=False,
                       env={"LLMTRAIN_FAULT_SAVE": "crash@4:1"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "llmtrain: saving step 4 failed: the writers of rank(s) 1 failed" in out.stderr
    assert checkpoint_steps(tmp_path) == ["iter_0000002"]


def test_only_changes_that_keep_the_experiment_pass_without_being_named():
    from llmtrain.config.changes import compare

    stored = {"model": {"hidden_size": 256, "hidden_dropout": 0.0}, "optim": {"lr": 1e-3},
              "stage": {"global_batch_size": 8, "micro_batch_size": 2},
              "parallel": {"tensor_model_parallel_size": 1}, "tokenizer": {"identity": "a"}}
    current = {"model": {"hidden_size": 320, "hidden_dropout": 0.1, "new_field": 1},
               "optim": {"lr": 5e-4}, "stage": {"global_batch_size": 16, "micro_batch_size": 4},
               "parallel": {"tensor_model_parallel_size": 2}, "tokenizer": {"identity": "b"}}
    accepted, refused = compare(stored, current, allowed=["stage.global_batch_size"])
    assert [c.key for c in accepted] == ["model.hidden_dropout", "optim.lr",
                                         "parallel.tensor_model_parallel_size",
                                         "stage.global_batch_size", "stage.micro_batch_size"]
    assert [str(c) for c in refused] == ["model.hidden_size: 256 -> 320",
                                         "tokenizer.identity: a -> b"]
    # Fine-tuning from weights: only the model and the tokenizer must match.
    _, refused = compare(stored, current, allowed=["model"], weights_only=True)
    assert [c.key for c in refused] == ["tokenizer.identity"]


def test_checkpoint_settings_are_validated_before_anything_runs():
    from conftest import compose_config
    from llmtrain.config.layout import Machine
    from llmtrain.config.validate import ConfigError, validate

    cfg = compose_config("checkpoint.keep_last=0", "checkpoint.keep_every=10",
                         "checkpoint.load_step=5", "checkpoint.resume=never",
                         "checkpoint.allow_config_change=[model.hidden,tokenizer,optim]",
                         "optim.on_nonfinite=ignore")
    with pytest.raises(ConfigError) as error:
        validate(cfg, Machine())
    assert error.value.problems == [
        "optim.on_nonfinite=ignore is not one of: stop, skip",
        "checkpoint.keep_last=0 must be at least 1 (or null)",
        "checkpoint.keep_every keeps steps that keep_last would delete: set checkpoint.keep_last "
        "too (without it every checkpoint is kept)",
        "checkpoint.load_step and checkpoint.resume=never contradict each other: drop one",
        "checkpoint.allow_config_change names model.hidden, which is no config field or group "
        "(write them as on the command line, e.g. model.hidden_size, or `tokenizer`)",
    ]
