"""``python -m bigscale.launch.torchrun [torchrun arguments]``: torchrun, failing by exit code.

The local launcher runs the plan's ``torch.distributed.run`` arguments through torchrun's own
``parse_args`` and ``run``, in this separate process (torchrun's agent installs signal handlers).
The only difference is how a failed run ends: torchrun raises ``ChildFailedError``, which prints a
traceback and a failure table after the rank's own message and exits 1. The ranks have already
said what went wrong (one ``error:`` line for a user error, a traceback for a crash), so this exits
with the first failing rank's code (128 + N for a rank killed by signal N) and adds nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
from torch.distributed.run import parse_args, run

from bigscale.dist.parent_death import die_with_parent
from bigscale.dist.watchdog import STALL_EXIT_CODE
from bigscale.errors import BigscaleError, DivergenceError


def main(argv: list[str] | None = None) -> int:
    # The launcher is gone: stop the run as on a scheduler's SIGTERM (the ranks save and exit).
    die_with_parent("torchrun's agent", signal.SIGTERM)
    # torchrun shares its rendezvous store with the ranks' process groups; after a restart the
    # new ranks can read the dead ranks' addresses from it (pytorch#135712) and hang in their
    # first new_group. A store of their own per restart avoids that.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    # The agent's warnings and errors (the OMP_NUM_THREADS banner, "sending SIGTERM", "failed
    # (exitcode: 2)") repeat what the ranks and the exit code already say. Only this process's
    # logging is affected; the ranks log as before.
    logging.disable(logging.ERROR)
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = _cause(exc)
        if failure.exitcode < 0:
            # A rank killed by a signal (the OOM killer, a node failure, kill -9) printed
            # nothing itself; say which one, since the others were stopped because of it.
            name = signal.Signals(-failure.exitcode).name
            print(f"error: rank {rank} (pid {failure.pid}) was killed by {name}", file=sys.stderr)
            return 128 - failure.exitcode
        return failure.exitcode
    except SignalException as exc:  # Ctrl-C or a scheduler's SIGTERM: the ranks were stopped
        return 128 + int(exc.sigval)
    return 0


def _cause(exc: ChildFailedError) -> tuple[int, ProcessFailure]:
    """The failure that explains the others. A rank that stopped on a bigscale error (a refused
    checkpoint, a divergence, a stuck rank named by the watchdog) said why and exited with its
    code; the ranks waiting for it in a collective then crash too, and torchrun may see one of them
    first."""
    said_why = (BigscaleError.exit_code, DivergenceError.exit_code, STALL_EXIT_CODE)
    for rank, failure in sorted(exc.failures.items()):
        if failure.exitcode in said_why:
            return rank, failure
    return exc.get_first_failure()


if __name__ == "__main__":
    sys.exit(main())
