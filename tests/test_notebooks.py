"""The notebooks run headless, as CI runs them: training curves of a tiny sweep (two jobs) read
from their TensorBoard events, and the report of a tiny conversion."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import FAST, ROOT, run_llmtrain
from llmtrain.curves import read_runs

NOTEBOOKS = ROOT / "notebooks"


def execute(name: str) -> str:
    """Run every cell of notebooks/<name> in a fresh kernel; the text and kinds of its outputs."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    out = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            out.append(output.get("text", ""))
            data = output.get("data", {})
            out.append(data.get("text/markdown", ""))
            out.extend(f"<{kind}>" for kind in data if kind.startswith("image/"))
    return "\n".join(out)


@pytest.fixture(autouse=True)
def _llmtrain_importable(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def test_training_curves_of_a_sweep(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    run_llmtrain("-m", *FAST, "optim.lr=1e-3,3e-3", "stage.train_iters=4",
                 "stage.global_batch_size=4", "stage.eval_interval=2", "stage.eval_iters=1",
                 "checkpoint.save=null", f"hydra.sweep.dir={sweep}")
    runs = read_runs(str(sweep))
    # Each job is labelled with what it changes.
    assert [r.label for r in runs] == ["optim.lr=0.001", "optim.lr=0.003"]
    assert runs[0].scalars["train/loss"][0] == [1, 2, 3, 4]
    assert runs[0].scalars["valid/loss"][0] == [2, 4]
    monkeypatch.setenv("LLMTRAIN_RUNS", str(sweep))
    out = execute("training_curves.ipynb")
    assert "<image/png>" in out
    # The summary table: one row per job, with its final loss as TensorBoard has it.
    for run in runs:
        assert f"| {run.label} | 4 | {run.last('train/loss'):.4f} |" in out


def test_conversion_report_viewer(tiny_llama, monkeypatch):
    _, mcore = tiny_llama
    report = json.loads((mcore / "conversion_report.json").read_text())
    monkeypatch.setenv("LLMTRAIN_CONVERSION_REPORT", str(mcore))
    out = execute("conversion_report.ipynb")
    assert "**PASSED**" in out and "<image/png>" in out
    for row in report["check"]["rows"]:
        assert f"| {row['name']} | {row['max_abs_diff']:.3e} |" in out


def test_a_missing_report_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMTRAIN_CONVERSION_REPORT", str(tmp_path))
    with pytest.raises(Exception, match="set REPORT to the output folder"):
        execute("conversion_report.ipynb")
