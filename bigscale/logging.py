"""Rank-zero logging through one helper instead of ``if rank == 0`` around every message.

Rank 0 logs INFO to the console and to ``<run_dir>/train.log``; other ranks log warnings and
errors only, prefixed with their rank, so a failure on any rank is still seen."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from bigscale.config.redact import redact_text

_ROOT = "bigscale"


class _Redacting(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact_text(record.getMessage())
        record.args = None
        return True


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def setup_logging(rank: int = 0, run_dir: Path | None = None) -> None:
    root = logging.getLogger(_ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.propagate = False
    prefix = "" if rank == 0 else f"[rank {rank}] "
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.addFilter(_Redacting())
    root.addHandler(console)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if run_dir is not None and rank == 0:
        file_handler = logging.FileHandler(Path(run_dir) / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        file_handler.addFilter(_Redacting())
        root.addHandler(file_handler)


def log_to_file_only(message: str) -> None:
    """Record an error already printed on the console in ``train.log`` too, so the run
    directory says why the run stopped."""
    for handler in logging.getLogger(_ROOT).handlers:
        if isinstance(handler, logging.FileHandler):
            # emit() skips the handler's filters, the redacting one included.
            record = logging.LogRecord(
                _ROOT, logging.ERROR, __file__, 0, redact_text(message), None, None
            )
            handler.emit(record)
