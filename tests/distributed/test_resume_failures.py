"""What a resume must survive or refuse, on copies of one real 2-rank ZeRO-2 run: a damaged
newest checkpoint, a save cut off half way, a changed config, new data under the old path,
resume=never, a planted pickle; a resumed run keeps logging into the same W&B run; export
refuses a damaged checkpoint; a disk that fills up during a save."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

from bigscale.data.tasks import write_arithmetic_task
from tests.cli import QUICK, bigscale, explain, train_rows
from tests.malicious import Payload

pytestmark = pytest.mark.distributed

# The data by relative paths, written (seeded) into each run's working directory as a user's own
# files: a copy of the run gets the same path and the same contents, unless a test writes other
# contents there.
SPLITS = ("train", "validation", "test")
DATA = [
    "data=sft_files",
    "data.max_length=16",
    *(
        f"data.{key}=data/{name}.jsonl"
        for key, name in zip(("path", "validation_path", "test_path"), SPLITS, strict=True)
    ),
]
ARGS = [
    "train",
    "strategy=zero2",
    "launcher.nproc_per_node=2",
    *QUICK,
    "logger.mode=offline",
    *DATA,
]


def write_data(work: Path) -> None:
    write_arithmetic_task(*(work / "data" / f"{name}.jsonl" for name in SPLITS), seed=0)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path) -> Path:
    work = tmp_path_factory.mktemp("resume_original")
    write_data(work)
    proc = bigscale([*ARGS, f"run_dir={work / 'run'}"], work, bigscale_home)
    assert proc.returncode == 0, explain(proc)
    return work / "run"


def copy_run(original: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(original, run)
    write_data(tmp_path)
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


# One resume past the original's end, with new optimizer settings, read by two tests: the
# W&B one needs only some resume that continues training (its own plain resume to step 26 was a
# launch of its own), and this one continues to step 28 in the same W&B run.
LOWER_LR = ["trainer.max_steps=28", "optim.lr=1e-3", "optim.weight_decay=0.1", "optim.beta2=0.99"]


@pytest.fixture(scope="module")
def resumed_with_new_optim(
    original: Path, tmp_path_factory: pytest.TempPathFactory, bigscale_home: Path
) -> Path:
    run = copy_run(original, tmp_path_factory.mktemp("resume_new_optim"))
    proc = resume(run, bigscale_home, *LOWER_LR)
    assert proc.returncode == 0, explain(proc)
    return run


def test_resumed_run_logs_into_the_same_wandb_run(resumed_with_new_optim: Path) -> None:
    run = resumed_with_new_optim
    run_id = (run / "wandb_run_id").read_text().strip()
    logs = sorted((run / "wandb").glob(f"offline-run-*/run-{run_id}.wandb"))
    assert len(logs) == 2, logs  # the first attempt's and the resumed one's, one W&B id
    assert [r["step"] for r in train_rows(run)][-3:] == [24, 26, 28]


def test_resume_takes_the_optimizer_settings_from_the_config(
    resumed_with_new_optim: Path, bigscale_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint restores the optimizer's state, but a resume "with a lower optim.lr" (the
    advice after a divergence) must train with the new lr, weight decay and betas."""
    from bigscale.config.compose import compose_config
    from bigscale.dist.engine import lr_lambda

    run = resumed_with_new_optim
    log = (run / "train.log").read_text()
    assert "optimizer setting from the config, not the checkpoint: peak lr" in log, log
    assert "-> 0.001" in log and "weight_decay 0.0 -> 0.1 (group 0)" in log
    assert "betas (0.9, 0.95) -> (0.9, 0.99)" in log
    monkeypatch.setenv("BIGSCALE_HOME", str(bigscale_home))
    cfg = compose_config([*ARGS[1:], *LOWER_LR])
    row = next(r for r in train_rows(run) if r["step"] == 26)
    # The lr logged with a step is the one the schedule set for the next step.
    assert row["lr"] == pytest.approx(1e-3 * lr_lambda(cfg.optim, 28)(26), rel=1e-9)


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


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    """Exit 2 and exactly one ``error:`` line, no traceback; returns that line."""
    assert proc.returncode == 2, explain(proc)
    assert "Traceback" not in proc.stderr, explain(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, explain(proc)
    return errors[0]


def run_record(run: Path) -> dict[Path, bytes]:
    """What a run directory says about its training: config, metrics, checkpoints."""
    files = [run / "config.yaml", run / "metrics.jsonl", *(run / "checkpoints").rglob("*")]
    return {p: p.read_bytes() for p in files if p.is_file()}


def test_changed_config_and_new_data_are_refused_naming_both_and_change_nothing(
    original: Path, tmp_path: Path, bigscale_home: Path
) -> None:
    """One refused resume for both causes (each was a launch of its own): the ranks compare the
    whole fingerprint at once and name every change, so each message below appears only if its
    own change was detected; the data path itself is the same, only its contents differ."""
    run = copy_run(original, tmp_path)
    train = tmp_path / "data" / "train.jsonl"
    train.write_text("".join(train.read_text().splitlines(keepends=True)[1:]))  # one row less
    before = run_record(run)

    error = one_error(resume(run, bigscale_home, "trainer.grad_accum=1"))
    assert "refusing to resume" in error
    assert "trainer.grad_accum: 2 in the checkpoint, 1 now" in error
    assert "the contents of data.path changed since the checkpoint was written" in error
    assert "data.path:" not in error  # the path itself is the same
    assert "checkpoint.allow_config_change=true" in error
    after = run_record(run)
    # config.yaml (it still describes the checkpoints), metrics and checkpoints byte for byte
    assert after == before
    assert "refusing to resume" in (run / "train.log").read_text()  # the run dir says why


def export(source: Path, out: Path, home: Path) -> subprocess.CompletedProcess[str]:
    return bigscale(["export", str(source), "--out", str(out)], out.parent, home)


def flip_bytes(path: Path, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_export_refuses_a_damaged_checkpoint_and_a_run_falls_back(
    original: Path, tmp_path: Path, bigscale_home: Path
) -> None:
    run = copy_run(original, tmp_path)
    newest = run / "checkpoints" / "step_00000024"
    shard = newest / "mp_rank_00_model_states.pt"
    flip_bytes(shard)  # same size: only the checksum can tell

    error = one_error(export(newest, tmp_path / "named", bigscale_home))
    assert error == f"error: refusing to export {newest}: {shard} does not match its checksum"
    assert not (tmp_path / "named").exists()

    proc = export(run, tmp_path / "out", bigscale_home)
    assert proc.returncode == 0, explain(proc)
    assert f"warning: skipped step_00000024, which is damaged: {shard} does not match" in (
        proc.stderr
    )
    assert "warning: exporting step_00000016, the newest intact checkpoint" in proc.stderr
    assert f"exported {run / 'checkpoints' / 'step_00000016'} to {tmp_path / 'out'}" in proc.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_export_of_a_run_whose_latest_dangles(
    original: Path, tmp_path: Path, bigscale_home: Path
) -> None:
    run = copy_run(original, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_00000024")  # latest still names it
    proc = export(run, tmp_path / "out", bigscale_home)
    assert proc.returncode == 0, explain(proc)
    latest = run / "checkpoints" / "latest"
    assert f"warning: {latest} names step_00000024, which does not exist" in proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()

    shutil.rmtree(run / "checkpoints" / "step_00000016")
    error = one_error(export(run, tmp_path / "none", bigscale_home))
    assert f"no intact checkpoint to export under {run / 'checkpoints'}" in error
    assert "names step_00000024, which does not exist" in error


def test_disk_full_during_a_save_is_one_error_and_keeps_the_last_checkpoint(
    original: Path, tmp_path: Path, bigscale_home: Path
) -> None:
    """A real full filesystem: a tmpfs with room for one checkpoint and a half, so the save at
    step 16 runs out of space (DeepSpeed's torch.save then says only "iostream error")."""
    step = original / "checkpoints" / "step_00000024"
    size = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(size * 1.5) + (1 << 20)}", "tmpfs", str(small)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        run = small / "run"
        # Only the checkpoints on the small disk: the tokenized data and W&B elsewhere or off.
        extra = [f"data.cache_dir={tmp_path / 'cache'}", "logger.mode=disabled"]
        write_data(tmp_path)
        proc = bigscale([*ARGS, f"run_dir={run}", *extra], tmp_path, bigscale_home)
        error = one_error(proc)
        print(error)  # what the user reads, for the test log
        assert error.startswith("error: checkpoint step_00000016 could not be written: no space ")
        assert f"no space left on {small} (device tmpfs, tmpfs, " in error
        assert "the last complete checkpoint (step_00000008) is intact" in error
        root = run / "checkpoints"
        assert not list(root.glob(".partial-*")), list(root.iterdir())
        assert (root / "latest").read_text().strip() == "step_00000008"
        assert sorted(p.name for p in root.glob("*step_*")) == ["step_00000008"]
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
