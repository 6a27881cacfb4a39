"""Check the checkpoint a resume will most likely read while the rank starts up.

A resumed rank spends seconds importing, tokenizing and building the model before it chooses
its checkpoint, and with ``checkpoint.verify`` the choice hashes every file (0.75 s for a
61.5M-parameter model's 984 MB on the dev box). The hashing releases the GIL, so it runs beside
that start-up work: this thread checks the rank's own share of the newest complete checkpoint's
files (the one ``resume=auto`` tries first, or the named one) and keeps the answer. The choice
itself does not change: ``CheckpointManager.resume_point`` still asks every candidate in the
same order, all ranks still agree on each answer with the same collective, and a damaged
checkpoint is still refused (or passed over) before any state is loaded; it only takes this
rank-local answer instead of reading the files a second time. Nothing is written."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from bigscale.checkpoint.select import check_files, complete_tags


class Precheck:
    """``check_files(directory, verify, share)`` of one directory, in a daemon thread (a rank
    that fails before resuming leaves without waiting for it)."""

    def __init__(self, directory: Path, verify: bool, share: tuple[int, int]):
        self.directory, self.verify, self.share = Path(directory), verify, share
        self._answer: str | None = None
        self._error: BaseException | None = None
        self._taken = False
        self._thread = threading.Thread(target=self._run, name="bigscale-precheck", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._answer = check_files(self.directory, self.verify, self.share)
        except BaseException as exc:  # re-raised where the answer is taken, as if checked there
            self._error = exc

    def answer_for(
        self, directory: Path, verify: bool, share: tuple[int, int]
    ) -> tuple[bool, str | None]:
        """``(True, problem)`` for the directory this thread checked, once; ``(False, None)``
        for any other question, which the caller then checks itself."""
        same = _same_path(directory, self.directory) and (verify, share) == (
            self.verify,
            self.share,
        )
        if self._taken or not same:
            return False, None
        self._taken = True
        self._thread.join()
        if self._error is not None:
            raise self._error
        return True, self._answer


def checkpoint_root(run_dir: Path) -> Path:
    """Where a run directory keeps its checkpoints."""
    return Path(run_dir) / "checkpoints"


def start_precheck(
    root: Path, resume: str, verify: bool, share: tuple[int, int]
) -> Precheck | None:
    """The check of the checkpoint ``resume`` would try first, started; None when there is none
    (``resume=never``, no complete checkpoint yet)."""
    if resume == "never":
        return None
    if resume != "auto":
        return Precheck(Path(resume), verify, share)
    tags = complete_tags(root)
    return Precheck(Path(root) / tags[-1], verify, share) if tags else None


def _same_path(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)
