"""Reading what a run left: its metrics rows and its settings."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigscale.errors import BigscaleError

METRICS = "metrics.jsonl"
CONFIG = "config.yaml"


class ReportError(BigscaleError):
    """A directory that is not a run (no metrics.jsonl)."""


@dataclass
class Run:
    directory: Path
    label: str
    rows: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    """config.yaml flattened to dotted keys (empty when the run has none)."""

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of ``key`` over the rows that hold a number for it."""
        steps, values = [], []
        for row in self.rows:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                steps.append(float(row.get("step", 0)))
                values.append(float(value))
        return steps, values


def read_run(directory: Path) -> Run:
    directory = Path(directory)
    path = directory / METRICS
    if not path.is_file():
        raise ReportError(f"{directory} is not a run directory: it has no {METRICS}")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write: the rest of the run still tells its story
        if isinstance(row, dict):
            rows.append(row)
    return Run(directory, directory.name, rows, _settings(directory / CONFIG))


def read_runs(directories: list[Path]) -> list[Run]:
    runs = [read_run(d) for d in directories]
    names = [r.label for r in runs]
    for run in runs:  # two runs of the same name (e.g. from two sweeps): add their parent
        if names.count(run.label) > 1:
            run.label = f"{run.directory.parent.name}/{run.directory.name}"
    return runs


def _settings(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        return {}
    return flatten(data) if isinstance(data, dict) else {}


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# Settings that differ between any two runs without telling them apart.
_NOT_SETTINGS = ("run_dir", "logger.name", "logger.group", "launcher.master_port")


def differing_settings(runs: list[Run]) -> list[str]:
    """The dotted keys whose values are not the same in every run."""
    keys = sorted({k for run in runs for k in run.settings} - set(_NOT_SETTINGS))
    missing = object()
    return [
        k
        for k in keys
        if len({json.dumps(run.settings.get(k, missing), default=str) for run in runs}) > 1
    ]
