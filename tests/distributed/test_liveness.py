"""A run's processes and its run directory, under the failures of a real cluster, on real 2-rank
ZeRO-2 runs: a second launch into a running run's directory is refused and changes nothing; the
ranks die with a killed launcher; a stopped rank ends the job within dist.timeout_minutes with an
error naming it, and the checkpoint before it stays intact."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.cli import (
    QUICK,
    bigscale,
    env_for,
    explain,
    rank_process,
    start,
    wait_for_checkpoint,
)

pytestmark = pytest.mark.distributed

ARGS = ["train", "strategy=zero2", "launcher.nproc_per_node=2", *QUICK]


def _run_processes(run_dir: Path) -> list[psutil.Process]:
    """Every process of this machine whose command line names the run directory."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if any(str(run_dir) in arg for arg in p.info["cmdline"] or []):
                found.append(p)
    return found


def _files(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file's size and modification time, but the lease (its holder refreshes it)."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in run_dir.rglob("*")
        if p.is_file() and p.name != "lease.json"
    }


def _verifies(checkpoint: Path) -> bool:
    manifest = json.loads((checkpoint / "manifest.json").read_text())["files"]
    return all((checkpoint / name).stat().st_size == f["size"] for name, f in manifest.items())


def test_second_launch_into_a_running_run_dir_is_refused(
    tmp_path: Path, bigscale_home: Path
) -> None:
    run_dir = tmp_path / "run"
    first = start([*ARGS, f"run_dir={run_dir}"], tmp_path, bigscale_home, capture=True)
    ranks = [rank_process(psutil.Process(first.pid), r) for r in (0, 1)]
    try:
        wait_for_checkpoint(first, run_dir, "step_00000008")
        # The tiny run would end before a second launch is even planned: hold its ranks (not the
        # launcher, which holds the lease) while the second one tries.
        for p in ranks:
            p.send_signal(signal.SIGSTOP)
        holder = json.loads((run_dir / "lease.json").read_text())
        files_before = _files(run_dir)

        second = bigscale([*ARGS, f"run_dir={run_dir}"], tmp_path, bigscale_home, timeout=300)
        assert second.returncode == 2, explain(second)
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, explain(second)
        assert f"run_dir {run_dir} is in use by another run" in errors[0]
        assert f"pid {first.pid} on {holder['host']}, since" in errors[0], errors[0]
        assert "choose another run_dir" in errors[0]
        still = json.loads((run_dir / "lease.json").read_text())
        assert (still["token"], still["pid"], still["since"]) == (
            holder["token"],
            holder["pid"],
            holder["since"],
        )
        assert _files(run_dir) == files_before
        for p in ranks:
            p.send_signal(signal.SIGCONT)

        _, err = first.communicate(timeout=600)
    finally:
        for p in ranks:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)
        if first.poll() is None:
            first.kill()
            first.communicate()
    assert first.returncode == 0, err[-6000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000024"
    assert not (run_dir / "lease.json").exists()  # released at the end


def _start_in_own_session(run_dir: Path, home: Path, stderr: Path) -> subprocess.Popen:
    """``bigscale train`` started with setsid, as a batch system's job step is."""
    # Steps to spare after a resume from the first run's SIGTERM checkpoint.
    args = [*ARGS, "trainer.max_steps=40", f"run_dir={run_dir}"]
    with stderr.open("w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "bigscale.cli", *args],
            cwd=run_dir.parent,
            env=env_for(home),
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )


def _kill_and_check_all_die(proc: subprocess.Popen, run_dir: Path, victim: str) -> None:
    """Kill ``victim`` (the launcher alone, or its whole process group) once the ranks run;
    the torchrun agent and both ranks must follow, and no checkpoint may come after."""
    ranks = [rank_process(psutil.Process(proc.pid), r) for r in (0, 1)]
    latest = run_dir / "checkpoints" / "latest"
    # The run's next regular checkpoint: a resumed run's ranks train on from their resume point.
    step = int(latest.read_text().strip().removeprefix("step_")) if latest.is_file() else 0
    wait_for_checkpoint(proc, run_dir, f"step_{(step // 8 + 1) * 8:08d}")
    try:
        agent = psutil.Process(proc.pid).children()[0]
        if victim == "process group":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs([agent, *ranks], timeout=30)
        assert not alive, f"outlived their launcher: {alive}"
        assert not _run_processes(run_dir)
        checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        time.sleep(3)  # a rank still training would write its next checkpoint soon after
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == checkpoints
    finally:
        for p in _run_processes(run_dir):
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_ranks_die_with_a_killed_launcher(tmp_path: Path, bigscale_home: Path) -> None:
    """Killing the launcher alone leaves torchrun's agent, which must follow it, stopping the
    ranks as on a SIGTERM (they save a checkpoint). The same command then resumes, taking over
    the dead launcher's lease; that resumed run ends with ``kill -9 -- -PGID`` of its process
    group: torchrun puts the ranks in sessions of their own, so only their parent-death
    handling can end them. (Each kill had a run of its own; the resume that followed the group
    kill took over a lease as this one does, so the second run is also the resume.)"""
    run_dir = tmp_path / "run"
    first = _start_in_own_session(run_dir, bigscale_home, tmp_path / "first.err")
    _kill_and_check_all_die(first, run_dir, "launcher alone")
    log = (run_dir / "train.log").read_text()
    stopped = re.search(r"stopped at step (\d+) on SIGTERM: checkpoint saved", log)
    assert stopped, log[-3000:]
    saved = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert saved == f"step_{int(stopped[1]):08d}"

    second = _start_in_own_session(run_dir, bigscale_home, tmp_path / "second.err")
    _kill_and_check_all_die(second, run_dir, "process group")
    err = (tmp_path / "second.err").read_text()
    assert f"lease: took over {run_dir} from a run that is gone (pid {first.pid} on" in err, err
    assert re.search(rf"resumed from \S+{saved} at step {int(stopped[1])}\b", err), err[-3000:]


def test_stopped_rank_ends_the_job_naming_it(tmp_path: Path, bigscale_home: Path) -> None:
    """SIGSTOP leaves a rank alive but silent, with rank 0 waiting in a collective (ZeRO-2's
    gradient all-reduce had no bound); the watchdog must end the job, naming rank 1, within
    dist.timeout_minutes (the subprocess timeout below is the bound: 15 s, plus torchrun's grace
    before SIGKILL, 30 s that torch's agent hard-codes on a failed worker). ZeRO-3, whose rank 0
    waits in the forward's parameter gather instead, was a second run of a minute: the watchdog
    does not depend on the collective (a thread of each rank watches the loop's progress marks
    and heartbeat files, and every c10d wait, all-reduce or all-gather, releases the GIL to it),
    and ZeRO-2's unbounded reduction is the case it was built for."""
    run_dir = tmp_path / "run"
    args = [*ARGS, f"run_dir={run_dir}", "dist.timeout_minutes=0.25", "checkpoint.keep_last=0"]
    proc = start(args, tmp_path, bigscale_home, capture=True)
    rank1 = rank_process(psutil.Process(proc.pid), 1)
    try:
        wait_for_checkpoint(proc, run_dir, "step_00000008")
        rank1.send_signal(signal.SIGSTOP)
        _, err = proc.communicate(timeout=150)
    finally:
        with contextlib.suppress(psutil.Error):
            rank1.send_signal(signal.SIGCONT)
            rank1.kill()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 4, err[-6000:]
    found = re.search(
        rf"error: rank 1 \(pid {rank1.pid} on \S+\) stopped making progress at step (\d+) "
        r"\(last seen in \w[\w ]*; no heartbeat for \d+ s\), dist.timeout_minutes=0.25",
        err,
    )
    assert found, err[-6000:]
    assert int(found[1]) >= 8
    assert "Traceback" not in err, err[-6000:]
    assert "rank 1 (pid" in (run_dir / "train.log").read_text()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert _verifies(run_dir / "checkpoints" / latest)
    assert _verifies(run_dir / "checkpoints" / "step_00000008")
