"""docs/troubleshooting.md shows real messages: each `$ python -m llmtrain ...` example in it
runs as written, is refused with status 2, and prints the lines shown."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

PAGE = ROOT / "docs" / "troubleshooting.md"


def examples() -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of the page's ```text blocks that start with `$ `."""
    found = []
    for block in re.findall(r"```text\n(.*?)```", PAGE.read_text(), flags=re.S):
        lines = block.rstrip("\n").splitlines()
        if lines[0].startswith("$ python -m llmtrain"):
            found.append((lines[0][2:], lines[1:]))
    return found


def test_the_page_has_examples():
    assert len(examples()) >= 5


@pytest.mark.parametrize("command,expected", examples(), ids=lambda v: v if isinstance(v, str)
                         else None)
def test_documented_message(command, expected, tmp_path):
    process = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.returncode == 2, process.stdout + process.stderr
    printed = process.stderr.splitlines()
    for line in expected:
        assert line in printed, f"{line!r} not in:\n{process.stderr}"
