"""``bigscale report RUN_DIR [RUN_DIR ...]``: the runs' curves overlaid in ``report.png`` and one
self-contained ``report.html`` with the settings that differ between them. A sweep's directory
stands for its jobs (the run directories inside it)."""

from __future__ import annotations

import argparse
from pathlib import Path

from bigscale.report.runs import CONFIG, METRICS, ReportError


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bigscale report")
    parser.add_argument("runs", nargs="+", type=Path, help="run directories, or a sweep's folder")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where report.html and report.png go (default: the run directory for one run, "
        "the folder holding them for several)",
    )
    ns = parser.parse_args(args)
    from bigscale.report.page import write_report
    from bigscale.report.runs import read_runs

    directories = expand(ns.runs)
    runs = read_runs(directories)
    out = ns.out or default_out(directories)
    page = write_report(runs, out)
    print(f"wrote {page} and {out / 'report.png'} ({len(runs)} run(s))")
    return 0


def expand(paths: list[Path]) -> list[Path]:
    """Each run directory as given; a folder without metrics.jsonl but with runs inside it (a
    sweep) as those runs, in name order."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise ReportError(f"{path}: no such run directory")
        if (path / METRICS).is_file():
            found.append(path)
            continue
        jobs = sorted(
            p for p in path.iterdir() if (p / METRICS).is_file() or (p / CONFIG).is_file()
        )
        if not jobs:
            raise ReportError(f"{path} is not a run directory (no {METRICS}) nor holds any")
        found += jobs
    return found


def default_out(directories: list[Path]) -> Path:
    if len(directories) == 1:
        return directories[0]
    parents = {d.resolve().parent for d in directories}
    return parents.pop() if len(parents) == 1 else Path("report")
