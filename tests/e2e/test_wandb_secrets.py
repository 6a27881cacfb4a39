"""A secret given through any route never reaches a file of the run, W&B's included, nor the
printed plan and command.

One real training run (W&B offline) plants a sentinel through each route: a value from
``${oc.env:...}`` with no recognisable shape, short tokens with a known prefix, a secret-named
environment variable whose value is pasted into an override, and a full-length ``hf_`` token.
Every file under the run directory is then searched byte by byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import QUICK, bigscale, explain
from tests.wandb_log import records, run_record

pytestmark = pytest.mark.e2e

FROM_OC_ENV = "ocenvSENTINEL456"  # no token shape: caught only because it came from the env
SHORT_SK = "sk-live-SENTINEL123"
SHORT_HF = "hf_SENTINEL789xyz"
FROM_SECRET_ENV = "envkeySENTINEL321"  # the value of MY_API_KEY, pasted into an override
FULL_HF = "hf_" + "Q7x" * 12
SENTINELS = [FROM_OC_ENV, SHORT_SK, SHORT_HF, FROM_SECRET_ENV, FULL_HF]


def test_secret_is_redacted_from_every_file(tmp_path: Path, bigscale_home: Path) -> None:
    run_dir = tmp_path / "run"
    quick = [
        o
        for o in QUICK
        if not o.startswith(("logger=", "trainer.max_steps", "optim.warmup", "checkpoint."))
    ]
    proc = bigscale(
        [
            "train",
            *quick,
            "trainer.max_steps=4",
            "optim.warmup_steps=1",
            "checkpoint.every_steps=2",
            "launcher.nproc_per_node=1",
            "logger.mode=offline",
            "logger.name=${oc.env:MY_SECRET}",
            f"logger.tags=[{SHORT_SK},{SHORT_HF},{FULL_HF}]",
            f"logger.group=g-{FROM_SECRET_ENV}",
            f"run_dir={run_dir}",
        ],
        cwd=tmp_path,
        home=bigscale_home,
        extra_env={"MY_SECRET": FROM_OC_ENV, "MY_API_KEY": FROM_SECRET_ENV},
    )
    assert proc.returncode == 0, explain(proc)
    printed = proc.stdout + proc.stderr
    assert "command " in proc.stdout  # the plan and its command were printed
    for sentinel in SENTINELS:
        assert sentinel not in printed, sentinel

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "train.log", "metrics.jsonl"} <= names, names
    assert any(p.match("checkpoints/*/*") for p in files)
    assert any(p.name.startswith("debug") and p.suffix == ".log" for p in files)
    wandb_logs = [p for p in files if p.suffix == ".wandb"]
    assert wandb_logs
    for sentinel in SENTINELS:
        leaked = [p for p in files if sentinel.encode() in p.read_bytes()]
        assert not leaked, (sentinel, leaked)

    # What W&B was told: the redacted name, group and tags, and the redacted command line.
    record = run_record(wandb_logs[0])
    assert record.display_name == "***REDACTED***"
    assert record.run_group == "g-***REDACTED***"
    assert list(record.tags) == ["***REDACTED***"] * 3
    args = [
        a for r in records(wandb_logs[0]) if r.HasField("environment") for a in r.environment.args
    ]
    assert "logger.name=${oc.env:MY_SECRET}" in args  # W&B records argv: it got a redacted one
    assert "logger.group=g-***REDACTED***" in args
    assert b"REDACTED" in (run_dir / "config.yaml").read_bytes()
