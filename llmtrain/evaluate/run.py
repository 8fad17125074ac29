"""An evaluation: find or start the model, run the harness tasks and the perplexity, print the
results table and write it (results.md) with the figures (results.json)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from llmtrain.evaluate import harness, perplexity
from llmtrain.evaluate.config import EvaluateConfig
from llmtrain.evaluate.server import describe, started
from llmtrain.generate.plan import InferenceError


def _check(c: EvaluateConfig) -> None:
    problems = []
    given = [k for k in ("server", "load", "hf") if getattr(c, k)]
    if len(given) != 1:
        problems.append("give exactly one of server=http://HOST:PORT (a running "
                        "llmtrain.serve), load=<checkpoint> or hf=<Hugging Face folder>"
                        + (f" (given: {', '.join(given)})" if given else ""))
    if not c.tasks and not c.perplexity.data_path:
        problems.append("nothing to evaluate: give tasks=[...] (lm-evaluation-harness) and/or "
                        "perplexity.data_path=[...] (indexed datasets)")
    if c.hf and c.perplexity.data_path:
        problems.append("perplexity runs on llmtrain's own model: give server= or load=")
    if c.hf and not Path(c.hf).is_dir():
        problems.append(f"hf={c.hf} is not a folder")
    if c.serve_overrides and not c.load:
        problems.append("serve_overrides apply to the server started for load=")
    for prefix in c.perplexity.data_path:
        missing = [f"{prefix}{s}" for s in (".bin", ".idx") if not Path(f"{prefix}{s}").exists()]
        if missing:
            problems.append(f"perplexity.data_path: {' and '.join(missing)} do(es) not exist")
    if c.include_path and not Path(c.include_path).exists():
        problems.append(f"include_path={c.include_path} does not exist")
    if c.batch_size < 1 or c.num_concurrent < 1 or c.perplexity.batch_size < 1:
        problems.append("batch_size, num_concurrent and perplexity.batch_size must be at least 1")
    if problems:
        raise InferenceError("the evaluation has problem(s):\n  - " + "\n  - ".join(problems))


def _served(c: EvaluateConfig):
    if c.load:
        return started(c.load, list(c.serve_overrides))
    if c.server:
        return contextlib.nullcontext(describe(c.server))
    return contextlib.nullcontext(None)


def table(report: dict) -> str:
    """The results as a Markdown table: lm-eval's own, then perplexity."""
    parts = []
    if "lm_eval" in report:
        from lm_eval.utils import make_table

        parts.append(make_table(report["lm_eval"]))
        if report["lm_eval"].get("groups"):
            parts.append(make_table(report["lm_eval"], "groups"))
    if "perplexity" in report:
        rows = ["| Dataset | Perplexity | NLL/token | Tokens | Windows |",
                "|---|---:|---:|---:|---:|"]
        rows += [f"| {prefix} | {r['perplexity']:.4f} | {r['nll_per_token']:.4f} | "
                 f"{r['tokens']} | {r['windows']} x {r['seq_length']} |"
                 for prefix, r in report["perplexity"].items()]
        parts.append("\n".join(rows) + "\n")
    return "\n".join(parts)


def execute(c: EvaluateConfig, say=print) -> dict:
    """Run the evaluation; return its report ("lm_eval": lm-eval's results, "perplexity")."""
    _check(c)
    report: dict = {"model": c.server or c.load or c.hf}
    with _served(c) as served:
        if c.tasks:
            results = harness.run(c, served)
            report["lm_eval"] = {k: results[k] for k in
                                 ("results", "groups", "group_subtasks", "versions", "n-shot",
                                  "higher_is_better", "n-samples", "configs") if k in results}
        if c.perplexity.data_path:
            report["perplexity"] = perplexity.run(served, c.perplexity)
    shown = table(report)
    say(shown)
    out = Path(c.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from lm_eval.utils import handle_non_serializable

    (out / "results.json").write_text(json.dumps(report, indent=1,
                                                 default=handle_non_serializable) + "\n")
    (out / "results.md").write_text(shown)
    say(f"[evaluate] results in {out / 'results.json'} and {out / 'results.md'}")
    return report
