"""The progress bar into a file (a Slurm log, a pipe): whole lines at a cadence, never one
endless carriage-return line; on a terminal, tqdm's redrawn bar."""

from __future__ import annotations

import io

from bigscale.metrics.sinks import ProgressBar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_into_a_file_it_writes_whole_lines_with_the_real_step() -> None:
    out = io.StringIO()
    bar = ProgressBar(total=10, initial=4, stream=out, line_seconds=0)  # resumed at step 4
    for step in range(5, 11):
        bar.update(step, {"loss": 1.25, "lr": 1e-4} if step == 6 else None)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 6 and lines[0].startswith("train:  50%") and " 5/10 " in lines[0]
    assert "10/10" in lines[-1] and "loss=1.25" in lines[-1]


def test_into_a_file_lines_are_spaced_by_time_and_the_last_step_is_always_written() -> None:
    out = io.StringIO()
    bar = ProgressBar(total=50, stream=out, line_seconds=3600)
    for step in range(1, 51):
        bar.update(step)
    assert out.getvalue().count("\n") == 1 and " 50/50 " in out.getvalue()


def test_on_a_terminal_tqdm_redraws_and_disabled_writes_nothing() -> None:
    tty = Terminal()
    bar = ProgressBar(total=3, stream=tty, line_seconds=0)
    for step in (1, 2, 3):
        bar.update(step)
    bar.close()
    assert "\r" in tty.getvalue()
    quiet = io.StringIO()
    off = ProgressBar(total=3, enabled=False, stream=quiet, line_seconds=0)
    off.update(3)
    off.close()
    assert quiet.getvalue() == ""
