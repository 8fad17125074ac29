"""`python -m llmtrain.bench.layouts`: one run per parallel layout, losses compared with the first.

Every layout of one seed starts from the same weights and sees the same batches, so their loss
curves must agree up to floating-point summation order; this prints, per layout, the largest
loss difference from the reference layout, and its throughput; with --metric, also the largest
difference of a stage's own measures (KL, value loss, reward of the alignment stages).

    python -m llmtrain.bench.layouts --layout "" --layout "parallel=tp2pp1" \
        --layout "parallel=tp1pp2" -- model=llama3_2_1b precision=bf16 stage.train_iters=20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from llmtrain.bench.__main__ import _run


def run_layout(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        _run([sys.executable, "-m", "llmtrain", *overrides, f"hydra.run.dir={run_dir}"])
        return json.loads((Path(run_dir) / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", action="append", default=[],
                        help="overrides of one layout (space-separated); the first is the reference")
    parser.add_argument("--metric", action="append", default=[],
                        help="a measure of summary.json's metrics to compare too (e.g. kl)")
    parser.add_argument("overrides", nargs="*", help="overrides shared by every layout")
    args = parser.parse_args()
    layouts = args.layout or [""]
    rows, metric_rows = [], []
    reference = None
    for layout in layouts:
        summary = run_layout([*args.overrides, *layout.split()])
        losses = summary["losses"]
        curves = {"loss": losses, **{m: summary["metrics"][m] for m in args.metric}}
        reference = reference or curves
        diff = _largest_difference(losses, reference["loss"])
        metric_rows.append([_largest_difference(curves[m], reference[m]) for m in args.metric])
        # Throughput over the second half of the run (past compilation and warm-up).
        step = statistics.median(summary["step_seconds"][len(summary["step_seconds"]) // 2:])
        speed = summary["tokens_per_step"] / step
        per_gpu = speed / summary["world_size"]
        peak = summary.get("peak_tflops")
        mfu = per_gpu * summary["flops_per_token"] / 1e12 / peak if peak else None
        rows.append((" ".join(layout.split()) or "(reference)", losses[0], losses[-1], diff, speed, per_gpu, mfu))
    print(f"\n{'layout':<58}{'first':>8}{'last':>8}{'max |dloss|':>13}{'tokens/s':>10}"
          f"{'per GPU':>9}{'MFU':>7}")
    for name, first, last, diff, speed, per_gpu, mfu in rows:
        mfu_text = f"{100 * mfu:.1f}%" if mfu else "-"
        print(f"{name[:58]:<58}{first:>8.4f}{last:>8.4f}{diff:>13.2e}{speed:>10,.0f}"
              f"{per_gpu:>9,.0f}{mfu_text:>7}")
    if args.metric:
        print(f"\n{'layout: max |d metric|':<58}" + "".join(f"{m:>13}" for m in args.metric))
        for (name, *_), diffs in zip(rows, metric_rows):
            print(f"{name[:58]:<58}" + "".join(f"{d:>13.2e}" for d in diffs))


def _largest_difference(curve: list[float], reference: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(curve, reference))


if __name__ == "__main__":
    main()
