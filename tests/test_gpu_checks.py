"""scripts/gpu_checks.sh, the GPU checklist: every step passes on the CPU with a tiny model
(GPU_CHECKS_TINY=1), so that a GPU run is never the first time one of its commands runs; a
failing step is reported with the end of its log and the next one still runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

STEPS = ["convert", "sft", "lora", "generate", "genbench", "servebench", "dpo", "grpo", "dapo", "resume",
         "vpp", "roles", "preference", "served_rm", "served_critic", "moe"]


def gpu_checks(tmp_path, *steps: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/gpu_checks.sh", *steps], cwd=ROOT, capture_output=True, text=True,
        timeout=1800, env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
                           "WORK": str(tmp_path / "work"), **env})


def test_a_failing_step_is_reported_and_the_next_one_runs(tmp_path):
    out = gpu_checks(tmp_path, "convert", "vpp", MODEL="no_such_model")
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"^\[convert\] FAILED \(exit 1\) after \d+ s; the end of .*/convert\.log:$",
                     out.stdout, re.M), out.stdout
    assert "[convert]     llmtrain: Could not find 'model/no_such_model'; the models" in out.stdout
    assert "[vpp] skipped: 0 GPU(s) visible, PP=2 needs 2" in out.stdout  # the CPU machine
    assert "[all] 2 step(s) in" in out.stdout and "failed: convert" in out.stdout
    assert (tmp_path / "out" / "summary.txt").read_text() == out.stdout


def test_an_unknown_step_is_refused_with_the_list(tmp_path):
    out = gpu_checks(tmp_path, "sft", "ppo")
    assert out.returncode == 2
    assert f"gpu_checks: no step ppo; the steps: {' '.join(STEPS)}" in out.stderr


@pytest.mark.slow
def test_every_step_passes_on_the_cpu(tmp_path):
    out = gpu_checks(tmp_path, GPU_CHECKS_TINY="1")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout
    for step in STEPS:
        assert re.search(rf"^\[{step}\] ok in \d+ s$", lines, re.M), lines
        assert (tmp_path / "out" / f"{step}.log").stat().st_size > 0
    assert "[convert] top-1 agreement of the logits: 1.000" in lines
    first, last = map(float, re.search(r"\[sft\] loss (\S+) -> (\S+) over", lines).groups())
    assert last < first / 4, lines
    assert "[generate] 'Who are you?' -> 'I am Xiaohuang" in lines
    assert "[lora] top-1 agreement of the logits: 1.000" in lines  # the merged export
    assert "[lora] 'Who are you?' -> 'I am Xiaohuang" in lines  # from the adapter checkpoint
    assert re.search(r"\[genbench\] +4 +[\d,.]+ +[\d,.]+ +[\d.]+x +100%", lines), lines
    assert re.search(r"\[genbench\] weight-bandwidth bound of batch 1: .* tokens/s", lines), lines
    for engine in ("auto", "megatron"):  # the load bench's figures, beside each other
        assert re.search(rf"\[servebench\] +{engine} +4 +[\d.]+ +[\d.]+ +[\d,.]+$", lines,
                         re.M), lines
    assert float(re.search(r"\[dpo\] margin 0 -> (\S+),", lines).group(1)) > 0.5, lines
    assert re.search(r"\[grpo\] reward \S+ -> \S+, kl 0 -> .*, seconds_rollout ", lines), lines
    # On the CPU a resumed run is bitwise the run that never stopped.
    assert re.search(r"\[resume\] steps 5-8: max \|loss C - A\| 0\.000e\+00", lines), lines
    assert re.search(r"\[vpp\] parallel=tp1pp2 parallel\.virtual.* [0-9.]+e-0[5-9] ", lines), lines
    # The roles on layouts of their own follow the run whose roles share the policy's.
    measures = lines[lines.index("[roles] layout: max |d metric|"):]
    kl, value_loss, reward = map(float, re.search(
        r"^\[roles\] stage\.alignment\.critic.* (\S+) +(\S+) +(\S+)$", measures,
        re.M).groups())
    assert kl < 1e-6 and value_loss < 1e-6 and reward == 0.0, lines
    # RM and DPO under TP=2 follow one process; their loss, margin and accuracy.
    tp2 = r"^\[preference\] parallel=tp2pp1 launcher\.nproc_per_node=2 +"
    losses = re.findall(tp2 + r"\S+ +\S+ +(\S+) ", lines, re.M)
    measures = re.findall(tp2 + r"(\S+) +(\S+)$", lines, re.M)
    assert len(losses) == len(measures) == 2, lines
    assert all(float(d) < 1e-5 for d in losses + [d for row in measures for d in row]), lines
    # The served reward model gives the rewards of the one loaded by the run.
    served = re.findall(r"^\[served_rm\] (reward|kl) A/B per step: .*; max \|B - A\| (\S+)$",
                        lines, re.M)
    assert [name for name, _ in served] == ["reward", "kl"], lines
    assert all(float(d) < 1e-5 for _, d in served), lines
    # The served critic trains as the one on the training ranks, and saves with the actor.
    served = re.findall(r"^\[served_critic\] (value_loss|reward|kl) A/B per step: .*; "
                        r"max \|B - A\| (\S+)$", lines, re.M)
    assert [name for name, _ in served] == ["value_loss", "reward", "kl"], lines
    assert all(float(d) < 1e-5 for _, d in served), lines
    assert "[served_critic] iter_0000004" in lines
    assert "[all] 13 step(s) in" in lines and "failed: none" in lines
