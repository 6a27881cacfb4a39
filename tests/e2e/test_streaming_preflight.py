"""A stream has no length: a schedule that needs one is refused by the launcher's pre-flight,
before any rank starts or any model loads, with the key to set instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import QUICK, bigscale, explain

pytestmark = pytest.mark.e2e


def test_streaming_with_epochs_asks_for_max_steps(tmp_path: Path, bigscale_home: Path) -> None:
    proc = bigscale(
        ["train", f"run_dir={tmp_path / 'run'}", *QUICK, "data.streaming=true", "trainer.epochs=1"],
        tmp_path,
        bigscale_home,
        timeout=120,
    )
    assert proc.returncode == 2, explain(proc)
    assert "error: trainer.epochs=1 needs the dataset's length" in proc.stderr, explain(proc)
    assert "set trainer.max_steps=" in proc.stderr
    assert "Traceback" not in proc.stderr and "parameters" not in proc.stderr  # no model
    # Refused while the plan was made: no run directory, so no rank ever started (a rank needs
    # one for its log), and no plan printed (it is printed just before the ranks start).
    assert not (tmp_path / "run").exists()
    assert "run directory" not in proc.stdout, explain(proc)
