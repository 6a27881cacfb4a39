"""A stuck rank ends the job within ``dist.timeout_minutes``, naming the rank.

Not every collective honours the process group's timeout: DeepSpeed's ZeRO-2 gradient reduction
waited for a SIGSTOPped rank with no bound. So bigscale keeps its own. The training loop marks its
progress (``PROGRESS.mark``: step, phase, and a count of marks within the step, which every rank
makes in the same order); a thread in each rank writes that, with the time, to
``RUN_DIR/heartbeats/rank_NNNNN.json`` every few seconds. When this rank has made no progress for
the timeout, the thread reads every rank's file to find who is behind: a rank whose file stopped
being refreshed (stopped, hung in C code, dead host), else the rank furthest back in the loop. It
says so and ends the process with ``STALL_EXIT_CODE``; torchrun then tears the job down (SIGTERM,
then SIGKILL, which a stopped process cannot ignore). Checkpoints are written to a partial
directory and renamed when complete, so the last complete one stays intact.

The watchdog is armed only where a bound makes sense: from the start of training to the end of
the final save. Model download and tokenization, which may legitimately take long, come before.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bigscale.logging import get_logger, log_to_file_only

log = get_logger(__name__)

STALL_EXIT_CODE = 4
HEARTBEAT_DIR = "heartbeats"
# The process group's own timeout is a backstop, later than the watchdog's, so a stuck rank is
# named by the watchdog instead of surfacing as a bare collective timeout on another rank.
BACKSTOP_EXTRA_MINUTES = 1.0


@dataclass
class Position:
    step: int = 0
    mark: int = 0
    """Marks since this step began: ranks make them in the same order, so a lower one is behind."""
    phase: str = "start"
    progress_at: float = 0.0


class Progress:
    """What this rank's main loop last did, and when. The loop writes, the watchdog reads; a
    whole ``Position`` is swapped in at once, so no lock is needed."""

    def __init__(self) -> None:
        self.position = Position(progress_at=time.time())

    def mark(self, phase: str, step: int | None = None) -> None:
        old = self.position
        step = old.step if step is None else step
        count = old.mark + 1 if step == old.step else 0
        self.position = Position(step, count, phase, time.time())


PROGRESS = Progress()


def backstop_minutes(timeout_minutes: float) -> float:
    """The process group's timeout for a run whose watchdog bound is ``timeout_minutes``."""
    return timeout_minutes + BACKSTOP_EXTRA_MINUTES


@dataclass
class Beat:
    rank: int
    host: str
    pid: int
    alive_at: float
    """When this rank's watchdog thread last wrote: it stops with a stopped or hung process."""
    step: int
    mark: int
    phase: str
    progress_at: float


class StallWatchdog:
    def __init__(self, run_dir: Path, rank: int, world_size: int, timeout_minutes: float):
        self.dir = Path(run_dir) / HEARTBEAT_DIR
        self.rank, self.world_size = rank, world_size
        self.timeout_minutes = timeout_minutes
        self.timeout_s = timeout_minutes * 60.0
        # One small file rename per rank every few seconds: little for a shared filesystem's
        # metadata server even with thousands of ranks, often enough for a short timeout.
        self.every_s = min(5.0, max(0.2, self.timeout_s / 30))
        # A rank whose file has not changed for this long is stopped or hung, not just slow to
        # write (a loaded node, a slow shared filesystem).
        self.silent_after_s = max(3 * self.every_s, min(self.timeout_s / 2, 30.0))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Arm (a lone rank has nobody to wait for, so it is never armed)."""
        if self.world_size < 2 or self._thread is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        PROGRESS.mark("training")
        self._write()
        self._thread = threading.Thread(target=self._run, name="bigscale-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            with contextlib.suppress(OSError):
                self._write()
            idle = time.time() - PROGRESS.position.progress_at
            if idle > self.timeout_s and not self._stop.is_set():
                self._stall(idle)

    def _write(self) -> None:
        p = PROGRESS.position
        beat = Beat(
            self.rank, socket.gethostname(), os.getpid(), time.time(), p.step, p.mark, p.phase,
            p.progress_at,
        )  # fmt: skip
        path = self.dir / f"rank_{self.rank:05d}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(beat)))
        os.replace(tmp, path)

    def read_beats(self) -> dict[int, Beat | None]:
        beats: dict[int, Beat | None] = {}
        for rank in range(self.world_size):
            try:
                data = json.loads((self.dir / f"rank_{rank:05d}.json").read_text())
                beats[rank] = Beat(**data)
            except (OSError, ValueError, TypeError):
                beats[rank] = None
        return beats

    def _stall(self, idle: float) -> None:
        message = stall_message(
            self.read_beats(), self.rank, time.time(), self.silent_after_s, self.timeout_minutes
        )
        culprits = message[1]
        with contextlib.suppress(Exception):
            log_to_file_only(message[0])
        # One rank tells the console: the lowest one that is not itself behind.
        reporter = min((r for r in range(self.world_size) if r not in culprits), default=0)
        if self.rank == reporter:
            with contextlib.suppress(Exception):
                print(message[0], file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            log.error("rank %d: no progress for %.0f s; ending the job", self.rank, idle)
        os._exit(STALL_EXIT_CODE)


def stall_message(
    beats: dict[int, Beat | None], me: int, now: float, silent_after_s: float, timeout_minutes: float
) -> tuple[str, set[int]]:
    """The ``error:`` line for a stall seen by rank ``me``, and the ranks it blames."""
    silent = {
        r for r, b in beats.items() if r != me and (b is None or now - b.alive_at > silent_after_s)
    }
    if silent:
        culprits = silent
    else:
        live = {r: b for r, b in beats.items() if b is not None}
        lowest = min((b.step, b.mark) for b in live.values())
        behind = {r for r, b in live.items() if (b.step, b.mark) == lowest}
        culprits = behind if len(behind) < len(live) else set()
    bound = f"dist.timeout_minutes={timeout_minutes:g}"
    advice = (
        "the job is stopped; the last complete checkpoint is intact. Check that rank's host (a "
        "stopped, swapping or hung process, a failing node) and run the same command to resume"
    )
    if not culprits:
        b = beats[me]
        where = f"step {b.step} ({b.phase})" if b else "an unknown step"
        return (
            f"error: no rank made progress at {where} for longer than {bound}: a collective is "
            f"hung; {advice}",
            set(),
        )
    parts = []
    mine = beats[me]
    for r in sorted(culprits):
        b = beats[r]
        if b is None:
            parts.append(f"rank {r} never reported progress")
            continue
        if r in silent:
            # Its last heartbeat may predate the step it stopped in; every rank meets every step's
            # all-reduce, so it stopped in the step this rank is waiting in.
            step = max(b.step, mine.step) if mine else b.step
            idle = f"last seen in {b.phase}; no heartbeat for {now - b.alive_at:.0f} s"
        else:
            step, idle = b.step, f"{b.phase}; no progress for {now - b.progress_at:.0f} s"
        parts.append(
            f"rank {r} (pid {b.pid} on {b.host}) stopped making progress at step {step} ({idle})"
        )
    return f"error: {'; '.join(parts)}, {bound}: {advice}", culprits
