"""The report's pieces on hand-written runs: which panels, which settings differ, and that a
run's own report never fails the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bigscale.report.page import write_report, write_run_report
from bigscale.report.plots import FIXED_PANELS, GENERATION_TITLE, build_figure, panels
from bigscale.report.runs import ReportError, differing_settings, read_runs


def make_run(directory: Path, rows: list[dict], config: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "config.yaml").write_text(config)
    return directory


ROWS = [
    {"step": 1, "loss": 3.0, "lr": 1e-3, "skipped_steps": 0, "loss_spikes": 0},
    {"step": 2, "loss": 9.0, "lr": 1e-3, "skipped_steps": 0, "loss_spikes": 1},
    {"step": 2, "eval_loss": 2.5, "eval_ppl": 12.2, "exact_match": 0.25, "my_score": 0.5},
    {"step": 3, "loss": 2.0, "lr": 5e-4, "skipped_steps": 1, "loss_spikes": 1},
    {"step": 3, "final/eval_loss": 2.0, "exact_match_before": 0.0},
]


def test_panels_follow_what_was_logged(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a", ROWS, "optim:\n  lr: 0.001\nrun_dir: a\nseed: 1\n")
    b = make_run(tmp_path / "b", ROWS[:2], "optim:\n  lr: 0.003\nrun_dir: b\nseed: 1\n")
    runs = read_runs([a, b])
    titles = [p.title for p in panels(runs)]
    # No grad norm, throughput or token share logged: no empty panels for them.
    assert titles == ["Loss", "Learning rate", FIXED_PANELS[5].title, GENERATION_TITLE]
    (generation,) = [p for p in panels(runs) if p.title == GENERATION_TITLE]
    assert generation.keys == ("exact_match", "my_score")  # not eval_ppl, final/*, *_before
    assert differing_settings(runs) == ["optim.lr"]  # run_dir differs but tells nothing
    fig = build_figure(runs)
    assert len(fig.axes) == 4
    loss_ax = fig.axes[0]
    # The spike (step 2) and the skipped step (step 3) are marked on each run's loss curve.
    marks = [[tuple(p) for p in c.get_offsets()] for c in loss_ax.collections]
    assert marks == [[(2.0, 9.0), (3.0, 2.0)], [(2.0, 9.0)]]
    page = write_report(runs, tmp_path / "out")
    text = page.read_text()
    assert "<td>optim.lr</td><td>0.001</td><td>0.003</td>" in text
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_report_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_run_report(tmp_path)  # no metrics.jsonl: the run must still end well
    assert "could not write the run's report" in caplog.text
    with pytest.raises(ReportError, match="no metrics.jsonl"):
        read_runs([tmp_path])
