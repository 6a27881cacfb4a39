"""A token given anywhere in the config never reaches a file of the run, W&B's included."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import QUICK, bigscale, explain

pytestmark = pytest.mark.e2e

SECRET = "hf_" + "Q7x" * 12


def test_secret_is_redacted_from_every_file(tmp_path: Path, bigscale_home: Path) -> None:
    run_dir = tmp_path / "run"
    quick = [o for o in QUICK if not o.startswith(("logger=", "trainer.max_steps", "optim.warmup"))]
    proc = bigscale(
        [
            "train",
            *quick,
            "trainer.max_steps=4",
            "optim.warmup_steps=1",
            "launcher.nproc_per_node=1",
            "logger.mode=offline",
            f"logger.group={SECRET}",
            f"logger.tags=[{SECRET}]",
            f"run_dir={run_dir}",
        ],
        cwd=tmp_path,
        home=bigscale_home,
    )
    assert proc.returncode == 0, explain(proc)
    assert SECRET not in proc.stdout + proc.stderr
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    leaked = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked
    assert b"REDACTED" in (run_dir / "config.yaml").read_bytes()
