"""Ranks never outlive the process that started them.

torchrun starts every rank in a session of its own, so ``kill -9 -- -PGID`` of a ``bigscale
train`` (or a dying agent) would leave the ranks training and checkpointing with PPID 1, unseen.
Two links are covered: the launcher -> torchrun's agent, and the agent -> each rank. The agent gets
SIGTERM when the launcher dies, which it answers as it answers a scheduler's SIGTERM: it passes it
on to the ranks, which save a checkpoint after the current step and exit, and SIGKILLs those still
running after its grace period (30 s). A rank whose agent is gone has nobody left to coordinate
with and is killed at once.

Linux's ``PR_SET_PDEATHSIG`` delivers the signal the moment the parent exits, but it fires when the
parent *thread* that forked exits, and only on Linux; a thread polling ``os.getppid()`` is the
part that always works, within ``POLL_S``."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable

from bigscale.logging import get_logger

log = get_logger(__name__)

POLL_S = 1.0
_PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def pdeathsig_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess``: the child gets ``sig`` when this process dies. The
    parent-death setting survives ``exec`` (launch/node.sh execs torchrun)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: after fork, only call into it

    def arm() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return arm


def die_with_parent(what: str, sig: int = signal.SIGKILL) -> None:
    """Receive ``sig`` when this process's parent dies (SIGKILL: end at once); ``what`` names
    this process in the log line. Call it first thing in a process started by a launcher or
    torchrun's agent."""
    parent = os.getppid()
    armed = _set_pdeathsig(sig)
    if os.getppid() != parent:
        _orphaned(what, parent, sig)  # the parent died before the signal was armed
        return
    # (A parent of pid 1 may be a live agent: torchrun as a container's first process.)
    threading.Thread(
        target=_watch, args=(what, parent, sig, armed), name="bigscale-parent-watch", daemon=True
    ).start()


def _watch(what: str, parent: int, sig: int, armed: bool) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_S):
        if os.getppid() != parent:
            if armed and sig != signal.SIGKILL:
                return  # the kernel sent it already; a second one would cut the shutdown short
            _orphaned(what, parent, sig)
            return


def _orphaned(what: str, parent: int, sig: int) -> None:
    with contextlib.suppress(Exception):  # the console may be gone with the parent
        log.error("%s: its parent process %d is gone; exiting", what, parent)
    if sig == signal.SIGKILL:
        os._exit(128 + signal.SIGKILL)
    os.kill(os.getpid(), sig)
