"""What a resume must survive or refuse, on copies of one real 2-rank ZeRO-2 run: a damaged
newest checkpoint, a save cut off half way, a changed config, resume=never, a planted pickle;
and a resumed run keeps logging into the same W&B run."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

from tests.cli import QUICK, bigscale, explain, train_rows
from tests.malicious import Payload

pytestmark = pytest.mark.distributed

ARGS = ["train", "strategy=zero2", "launcher.nproc_per_node=2", *QUICK, "logger.mode=offline"]


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path) -> Path:
    work = tmp_path_factory.mktemp("resume_original")
    proc = bigscale([*ARGS, f"run_dir={work / 'run'}"], work, bigscale_home)
    assert proc.returncode == 0, explain(proc)
    return work / "run"


def copy_run(original: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(original, run)
    return run


def resume(run: Path, home: Path, *extra: str):
    return bigscale([*ARGS, f"run_dir={run}", *extra], run.parent, home)


def test_damaged_newest_checkpoint_falls_back_to_previous(
    original: Path, tmp_path: Path, bigscale_home: Path
) -> None:
    run = copy_run(original, tmp_path)
    root = run / "checkpoints"
    (shard,) = (root / "step_00000024").glob("zero_pp_rank_1_*optim_states.pt")
    with shard.open("r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    # What a job killed while saving leaves behind: a partial directory, never renamed.
    (root / ".partial-step_00000032").mkdir()
    (root / ".partial-step_00000032" / "mp_rank_00_model_states.pt").write_bytes(b"half")

    proc = resume(run, bigscale_home)
    assert proc.returncode == 0, explain(proc)
    # The plan names the checkpoint resume uses, not the damaged one `latest` points at.
    assert "resume          from step_00000016 (resume=auto)" in proc.stdout
    assert "skipped: newer step_00000024 is damaged" in proc.stdout
    assert "step_00000024 is damaged" in proc.stderr and shard.name in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000016 at step 16" in proc.stderr

    # Steps 17-24 were trained again and came out exactly as the first time.
    def exact(rows: list[dict]) -> list[tuple]:
        return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows]

    assert exact(train_rows(run)) == exact(train_rows(original))
    assert not list(root.glob(".partial-*"))
    assert (root / "latest").read_text().strip() == "step_00000024"


def test_resumed_run_logs_into_the_same_wandb_run(
    original: Path, tmp_path: Path, bigscale_home: Path
) -> None:
    run = copy_run(original, tmp_path)
    proc = resume(run, bigscale_home, "trainer.max_steps=26")
    assert proc.returncode == 0, explain(proc)
    run_id = (run / "wandb_run_id").read_text().strip()
    logs = sorted((run / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    assert len(logs) == 2, logs  # the first attempt's and the resumed one's, one W&B id
    assert [r["step"] for r in train_rows(run)][-2:] == [24, 26]


def test_config_change_is_refused_with_what_changed(
    original: Path, tmp_path: Path, bigscale_home: Path
) -> None:
    run = copy_run(original, tmp_path)
    proc = resume(run, bigscale_home, "trainer.grad_accum=1")
    assert proc.returncode == 2, explain(proc)
    assert "refusing to resume" in proc.stderr
    assert "trainer.grad_accum: 2 in the checkpoint, 1 now" in proc.stderr
    assert "checkpoint.allow_config_change=true" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "refusing to resume" in (run / "train.log").read_text()  # the run dir says why


def test_resume_never_refuses_a_run_with_checkpoints(
    original: Path, tmp_path: Path, bigscale_home: Path
) -> None:
    run = copy_run(original, tmp_path)
    proc = resume(run, bigscale_home, "resume=never")
    assert proc.returncode == 2, explain(proc)
    assert "resume=never" in proc.stderr and "step_00000024" in proc.stderr


def test_planted_pickle_does_not_execute_even_with_a_forged_manifest(
    original: Path, tmp_path: Path, bigscale_home: Path
) -> None:
    run = copy_run(original, tmp_path)
    tag = run / "checkpoints" / "step_00000024"
    marker = tmp_path / "pwned"
    target = tag / "train_state_rank00000.pt"
    target.write_bytes(pickle.dumps({"step": Payload(marker)}))
    manifest = json.loads((tag / "manifest.json").read_text())
    manifest["files"][target.name] = {
        "size": target.stat().st_size,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
    }
    (tag / "manifest.json").write_text(json.dumps(manifest))

    proc = resume(run, bigscale_home)
    assert proc.returncode == 2, explain(proc)
    assert "refusing to load" in proc.stderr
    assert not marker.exists()


def test_resume_takes_the_optimizer_settings_from_the_config(
    original: Path, tmp_path: Path, bigscale_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint restores the optimizer's state, but a resume "with a lower optim.lr" (the
    advice after a divergence) must train with the new lr, weight decay and betas."""
    from bigscale.config.compose import compose_config
    from bigscale.dist.engine import lr_lambda

    run = copy_run(original, tmp_path)
    extra = ["trainer.max_steps=28", "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.beta2=0.99"]
    proc = resume(run, bigscale_home, *extra)
    assert proc.returncode == 0, explain(proc)
    log = (run / "train.log").read_text()
    assert "optimizer setting from the config, not the checkpoint: peak lr" in log, log
    assert "-> 0.001" in log and "weight_decay 0.0 -> 0.1 (group 0)" in log
    assert "betas (0.9, 0.95) -> (0.9, 0.99)" in log
    monkeypatch.setenv("BIGSCALE_HOME", str(bigscale_home))
    cfg = compose_config([*ARGS[1:], *extra])
    row = next(r for r in train_rows(run) if r["step"] == 26)
    # The lr logged with a step is the one the schedule set for the next step.
    assert row["lr"] == pytest.approx(1e-3 * lr_lambda(cfg.optim, 28)(26), rel=1e-9)
