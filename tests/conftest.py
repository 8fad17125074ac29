"""Shared helpers: compose configs the way the CLI does, and run the CLI as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from llmtrain.cli import CONF_DIR
from llmtrain.config.store import register

ROOT = Path(__file__).resolve().parent.parent
register()

# A tiny job that takes seconds on two CPU cores.
FAST = ["data.seq_length=64", "stage.micro_batch_size=2", "stage.global_batch_size=8",
        "stage.eval_interval=0", "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.lr_warmup_iters=2"]


def compose_config(*overrides: str, output_dir: str = "/tmp/llmtrain-test", typed: bool = True):
    """The config `python -m llmtrain <overrides>` would run: typed, or as Hydra composed it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=list(overrides))
    cfg.output_dir = output_dir
    return OmegaConf.to_object(cfg) if typed else cfg


def run_llmtrain(*args: str, module: str = "llmtrain", check: bool = True,
                 timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> args...` from the repository root, as a user types it."""
    process = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    if check and process.returncode != 0:
        raise AssertionError(f"python -m {module} {' '.join(args)} failed "
                             f"({process.returncode}):\n{process.stdout[-4000:]}\n"
                             f"{process.stderr[-6000:]}")
    return process


def summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


@pytest.fixture(scope="session", autouse=True)
def _corpus_built():
    """Build the embedded corpus once, before tests that time out on their first use."""
    from llmtrain.data.corpus import ensure_corpus

    ensure_corpus()


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama with the corpus tokenizer and a chat template, as a Hugging Face
    folder and converted to a Megatron-Core checkpoint: (hf, mcore)."""
    from hf_models import tiny_hf
    from llmtrain.convert import convert

    root = tmp_path_factory.mktemp("tiny_llama")
    hf = tiny_hf("llama", root / "hf", tokenizer=True)
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": CHAT_TEMPLATE, "eos_token": "<|endoftext|>"}))
    convert(f"input={hf}", f"output={root / 'mcore'}", say=lambda *_: None)
    return hf, root / "mcore"


def run_read_only(folder: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m <module> ARGS` with `folder` read-only: a read-only bind mount in a private
    mount namespace as root (root ignores permission bits), no write permission else."""
    command = [sys.executable, "-m", module, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        finally:
            folder.chmod(0o755)
    if shutil.which("unshare") is None:
        pytest.skip("a read-only folder for root needs unshare -m")
    mount = f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && "
    done = subprocess.run(["unshare", "-m", "sh", "-c", mount + " ".join(f"'{c}'" for c in command)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if "mount:" in done.stderr:
        pytest.skip(f"cannot mount here: {done.stderr.strip()}")
    return done
