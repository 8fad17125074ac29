"""Training curves of finished or running runs, read back from their TensorBoard event files:
what the notebooks under notebooks/ plot (loss, learning rate, throughput, MFU) for one run or
the jobs of a sweep."""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The scalars training writes (llmtrain/metrics.py), with what a plot calls them.
CURVES = {
    "train/loss": "training loss",
    "valid/loss": "validation loss",
    "train/lr": "learning rate",
    "train/grad_norm": "gradient norm",
    "throughput/tokens_per_s": "tokens/s",
    "throughput/tflops_per_gpu": "TFLOP/s per GPU",
    "throughput/mfu": "MFU",
    "memory/peak_gib": "peak memory (GiB)",
}


@dataclass
class Run:
    """One run's folder, a label that tells it from the others of a sweep, and its scalars as
    tag -> (steps, values)."""

    folder: Path
    label: str
    scalars: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    def last(self, tag: str):
        steps, values = self.scalars.get(tag, ([], []))
        return values[-1] if values else None


def _overrides(folder: Path) -> list[str]:
    """The command-line overrides of a run (Hydra's .hydra/overrides.yaml)."""
    path = folder / ".hydra" / "overrides.yaml"
    return (yaml.safe_load(path.read_text()) or []) if path.exists() else []


def _labels(folders: list[Path]) -> list[str]:
    """What tells each run from the others: the overrides not shared by all of them (a sweep's
    swept values), else the folder's name."""
    overrides = [_overrides(f) for f in folders]
    shared = set.intersection(*map(set, overrides)) if len(folders) > 1 else set()
    return [" ".join(o for o in chosen if o not in shared) or folder.name
            for folder, chosen in zip(folders, overrides)]


def find_runs(*patterns: str) -> list[Path]:
    """Run folders (those holding tensorboard/ event files) under the given folders or glob
    patterns: a run's folder, a sweep's folder (multirun/<name>/<time>/), or outputs/."""
    found = set()
    for pattern in patterns:
        for match in glob.glob(str(Path(pattern).expanduser())):
            for events in Path(match).rglob("events.out.tfevents.*"):
                if events.parent.name == "tensorboard":
                    found.add(events.parent.parent)
    # Job 10 after job 9: numbers in paths compare as numbers.
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t
                                        for t in re.split(r"(\d+)", str(p))])


def read_run(folder: Path | str, label: str = "") -> Run:
    """The scalars of every event file under folder/tensorboard (a resumed run appends new
    files; the last value written for a step wins)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(folder)
    run = Run(folder, label or folder.name)
    by_tag: dict[str, dict[int, float]] = {}
    for events in sorted((folder / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                by_tag.setdefault(tag, {})[event.step] = event.value
    for tag, points in by_tag.items():
        steps = sorted(points)
        run.scalars[tag] = (steps, [points[s] for s in steps])
    return run


def read_runs(*patterns: str) -> list[Run]:
    """Every run found under the patterns, read; an error that says what to do when none is."""
    folders = find_runs(*patterns)
    if not folders:
        raise FileNotFoundError(f"no run with TensorBoard events under {', '.join(patterns)}: "
                                f"point at a run's folder (outputs/<name>), a sweep's "
                                f"(multirun/<name>/<time>) or a folder holding them, and check "
                                f"that the runs had logging.tensorboard=true")
    return [read_run(f, label) for f, label in zip(folders, _labels(folders))]
