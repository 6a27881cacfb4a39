"""The run directory's lease on real files and processes: a live holder refuses a second one, a
dead one (pid gone here, stale heartbeat elsewhere) is taken over, the same Slurm job continues;
and the stall watchdog's verdict on real heartbeat files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from bigscale.dist.watchdog import Beat, StallWatchdog, stall_message
from bigscale.train import lease


def _plant(run_dir: Path, **changes: object) -> lease.Holder:
    holder = lease.Holder.me(None)
    for key, value in changes.items():
        setattr(holder, key, value)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / lease.LEASE_FILE).write_text(json.dumps(asdict(holder)))
    return holder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_refuses_a_second_run_untouched(tmp_path: Path) -> None:
    held = lease.acquire(tmp_path / "run")
    before = (tmp_path / "run" / lease.LEASE_FILE).read_text()
    with pytest.raises(lease.RunDirBusyError) as refused:
        lease.acquire(tmp_path / "run")
    message = str(refused.value)
    assert f"pid {held.holder.pid} on {held.holder.host}, since" in message
    assert "choose another run_dir" in message
    assert (tmp_path / "run" / lease.LEASE_FILE).read_text() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [lease.LEASE_FILE]
    held.release()
    assert not (tmp_path / "run").exists()  # made for the lease, left empty: removed again
    again = lease.acquire(tmp_path / "run")  # free again
    (tmp_path / "run" / "train.log").write_text("")
    again.release()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["train.log"]


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path: Path) -> None:
    _plant(tmp_path, pid=_dead_pid())
    held = lease.acquire(tmp_path)
    assert lease.read_holder(tmp_path / lease.LEASE_FILE) == held.holder
    assert held.note and held.note.startswith(f"lease: took over {tmp_path} from a run that is")
    held.release()


def test_a_recycled_pid_is_not_the_holder(tmp_path: Path) -> None:
    # This process's pid, but another process's start time: the holder is gone.
    _plant(tmp_path, pid_start="1")
    lease.acquire(tmp_path).release()


def test_another_host_counts_by_heartbeat(tmp_path: Path) -> None:
    _plant(tmp_path, host="elsewhere", heartbeat=time.time())
    with pytest.raises(lease.RunDirBusyError, match="on elsewhere"):
        lease.acquire(tmp_path)
    _plant(tmp_path, host="elsewhere", heartbeat=time.time() - lease.STALE_S - 1)
    lease.acquire(tmp_path).release()


def test_the_same_slurm_job_continues_under_its_lease(tmp_path: Path) -> None:
    # A requeued job: its first attempt's rank 0 is gone, the id is the same.
    first = _plant(tmp_path, job="4242", host="node7", heartbeat=time.time())
    held = lease.acquire(tmp_path, job="4242")
    assert held.holder.job == "4242" and held.holder.since == first.since
    assert held.note == f"lease: Slurm job 4242 continues in {tmp_path} (requeued)"
    with pytest.raises(lease.RunDirBusyError, match="Slurm job 4242, pid"):
        lease.acquire(tmp_path, job="4243")  # another job: refused while 4242 is alive
    held.release()


def test_heartbeat_refreshes_and_stops_when_taken_over(tmp_path: Path) -> None:
    held = lease.acquire(tmp_path)
    first = held.holder.heartbeat
    held.start_heartbeat(every_s=0.05)
    deadline = time.monotonic() + 30
    while lease.read_holder(tmp_path / lease.LEASE_FILE).heartbeat == first:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    other = _plant(tmp_path, token="someone-else")
    time.sleep(0.3)
    held.release()  # not ours any more: left in place
    assert lease.read_holder(tmp_path / lease.LEASE_FILE) == other


def test_an_unreadable_lease_is_refused_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / lease.LEASE_FILE).write_text("{not json")
    with pytest.raises(lease.RunDirBusyError, match="delete the file"):
        lease.acquire(tmp_path)


def _beat(rank: int, alive_at: float, step: int, mark: int, progress_at: float) -> Beat:
    return Beat(rank, "h", 100 + rank, alive_at, step, mark, "training", progress_at)


def test_the_stall_verdict_names_a_silent_rank_or_the_one_behind(tmp_path: Path) -> None:
    now = 1000.0
    silent = {0: _beat(0, now, 5, 3, now - 20), 1: _beat(1, now - 19, 5, 3, now - 19)}
    message, culprits = stall_message(silent, 0, now, 1.0, 0.25)
    assert culprits == {1}
    assert message.startswith("error: rank 1 (pid 101 on h) stopped making progress at step 5")
    assert (
        "(last seen in training; no heartbeat for 19 s)" in message
        and "dist.timeout_minutes=0.25" in message
    )

    behind = {0: _beat(0, now, 7, 2, now - 20), 1: _beat(1, now, 7, 1, now - 30)}
    assert stall_message(behind, 0, now, 1.0, 0.25)[1] == {1}
    even = {0: _beat(0, now, 7, 2, now - 20), 1: _beat(1, now, 7, 2, now - 20)}
    message, culprits = stall_message(even, 1, now, 1.0, 0.25)
    assert culprits == set() and "no rank made progress at step 7" in message

    # Through the files: a rank that never wrote its heartbeat is named.
    dog = StallWatchdog(tmp_path, rank=0, world_size=2, timeout_minutes=0.25)
    dog.dir.mkdir()
    dog._write()
    message, culprits = stall_message(dog.read_beats(), 0, time.time(), dog.silent_after_s, 0.25)
    assert culprits == {1} and "rank 1 never reported progress" in message
