"""The README's quickstart, block by block, as a new user types it: each bash block between
`<!-- quickstart -->` and `<!-- /quickstart -->` runs in order in one empty folder, with
`python` the environment's and llmtrain on PYTHONPATH, and what it prints and writes is checked.
About four minutes on two CPU cores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

README = ROOT / "README.md"


def quickstart_blocks(readme: Path = README) -> list[str]:
    """The bash blocks of the README's quickstart, in order."""
    text = readme.read_text()
    start, end = text.index("<!-- quickstart -->"), text.index("<!-- /quickstart -->")
    return re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)


def _summary(folder: Path, run: str) -> dict:
    return json.loads((folder / "outputs" / run / "summary.json").read_text())


def _check(number: int, folder: Path, out: str, printed: str) -> None:
    """What a user looks at after each block (`out`: all it wrote, `printed`: its stdout)."""
    if number == 0:
        assert "clean: read 2000 documents" in out and "shard:" in out
        assert sorted(p.name for p in (folder / "shards").iterdir()) == [
            "shard_00000.jsonl.zst", "shard_00001.jsonl.zst"]
    elif number == 1:
        assert "tokenize:" in out and (folder / "tok/docs_text_document.idx").exists()
    elif number == 2:
        run = _summary(folder, "pretrain_tiny")
        assert run["steps"] == 20 and run["final_loss"] < run["first_loss"] - 0.5
        assert "validation loss" in out
        assert (folder / "outputs/pretrain_tiny/checkpoints/iter_0000020").is_dir()
        assert list((folder / "outputs/pretrain_tiny/tensorboard").glob("events.out.tfevents.*"))
    elif number == 3:
        assert (folder / "hf_tiny/config.json").exists()
        assert "chat_template" in json.loads((folder / "hf_tiny/tokenizer_config.json").read_text())
    elif number == 4:  # one command: the Hugging Face folder in, a Hugging Face folder out
        run = _summary(folder, "sft_hf_tiny")
        assert "40 conversations" in out and run["final_loss"] < 1.0
        assert "converting it (once)" in out and "top-1 agreement of the logits: 1.000" in out
        saved = folder / "outputs/sft_hf_tiny/checkpoints"
        assert list(saved.glob("hf_iter_*/model.safetensors"))
    elif number == 5:
        answers = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
        assert [a["messages"][0]["content"] for a in answers] == ["Who are you?", "你是谁？"]
        assert "Xiaohuang" in answers[0]["generated_text"]
        assert "ModelScope" in answers[0]["generated_text"]
        assert "Xiaohuang" in answers[1]["generated_text"]
    elif number == 6:
        assert (folder / "tasks/who.yaml").exists()
    elif number == 7:
        assert "I am Xiaohuang" in out  # the client's chat reply
        results = json.loads((folder / "eval_results/results.json").read_text())
        assert results["lm_eval"]["results"]["who_am_i"]["acc,none"] >= 2 / 3
        (scored,) = results["perplexity"].values()
        assert scored["tokens"] > 0 and scored["perplexity"] > 1
        assert "[serve] stopped" in (folder / "serve.log").read_text()
    elif number == 8:
        assert (folder / "hf_xiaohuang/model.safetensors").exists()
        assert "I am Xiaohuang" in printed.strip().splitlines()[-1]  # transformers' reply


def test_readme_quickstart_runs_as_written(tmp_path):
    blocks = quickstart_blocks()
    assert len(blocks) == 9, "the quickstart's blocks changed: update the checks above"
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    seconds = []
    for number, block in enumerate(blocks):
        started = time.monotonic()
        process = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=600)
        out = process.stdout + process.stderr
        seconds.append(time.monotonic() - started)
        assert process.returncode == 0, \
            f"quickstart block {number + 1} failed:\n{block}\n{out[-5000:]}"
        try:
            _check(number, tmp_path, out, process.stdout)
        except Exception as error:
            raise AssertionError(f"quickstart block {number + 1}:\n{block}\n{out[-5000:]}") \
                from error
    print("quickstart blocks, seconds:", " ".join(f"{s:.0f}" for s in seconds))
