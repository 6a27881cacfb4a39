"""Ranks never outlive the process that started them.

torchrun starts every rank in a session of its own, so ``kill -9 -- -PGID`` of a ``bigscale
train`` (or a dying agent) would leave the ranks training and checkpointing with PPID 1, unseen.
Two links are covered: the launcher -> torchrun's agent (the agent is started with a parent-death
signal, ``pdeathsig_preexec``), and the agent -> each rank (the rank arms ``die_with_parent``).

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


def pdeathsig_preexec(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess``: the child gets ``sig`` when this process dies. The
    parent-death setting survives ``exec`` (launch/node.sh execs torchrun)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: after fork, only call into it

    def arm() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return arm


def die_with_parent(what: str) -> None:
    """End this process at once when its parent dies (``what`` names this process in the log
    line). Call it first thing in a process started by a launcher or torchrun's agent."""
    parent = os.getppid()
    _set_pdeathsig(signal.SIGKILL)
    if os.getppid() != parent:
        _orphaned(what, parent)  # the parent died before the signal was armed
    # (A parent of pid 1 may be a live agent: torchrun as a container's first process.)
    threading.Thread(
        target=_watch, args=(what, parent), name="bigscale-parent-watch", daemon=True
    ).start()


def _watch(what: str, parent: int) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_S):
        if os.getppid() != parent:
            _orphaned(what, parent)


def _orphaned(what: str, parent: int) -> None:
    with contextlib.suppress(Exception):  # the console may be gone with the parent
        log.error("%s: its parent process %d is gone; exiting", what, parent)
    os._exit(128 + signal.SIGKILL)
