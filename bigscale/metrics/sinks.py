"""Where metrics go: ``metrics.jsonl`` in the run directory, W&B, TensorBoard, MLflow
(``mlflow_sink``), and a console progress bar.

Only rank 0 writes; ``MetricsLogger`` fans one row out to every sink so the training loop logs
each number once."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from bigscale.config.redact import redact, redact_text
from bigscale.config.schema import LoggerConfig, LoggerMode
from bigscale.errors import ConfigError
from bigscale.logging import get_logger
from bigscale.metrics.mlflow_sink import MlflowSink

log = get_logger(__name__)


class JsonlSink:
    """One JSON object per line. A resumed run continues the same file from the checkpoint's
    step: rows a killed attempt logged after that step are dropped first, so every step appears
    once, as the run that survived logged it."""

    def __init__(self, path: Path, resumed_at: int = 0):
        if path.is_file():
            kept = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resumed_at
            ]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
            os.replace(tmp, path)
        self._file = path.open("a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(_finite(row)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class WandbSink:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any]):
        import wandb

        # W&B records the command line (``sys.argv``, read while it starts) in the run's metadata
        # (run-*.wandb, wandb-metadata.json); an override may carry a token, so it reads a
        # redacted copy. Everything else it is given is redacted here too.
        argv = sys.argv
        sys.argv = [redact_text(a) for a in argv]
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=redact(cfg.name, "name", "logger.name") or redact_text(run_dir.name),
                group=redact(cfg.group, "group", "logger.group"),
                tags=redact(list(cfg.tags), "tags", "logger.tags"),
                config=redact(config),
                dir=str(run_dir),
                mode=cfg.mode.value,
                id=_run_id(run_dir),
                resume="allow",
                settings=wandb.Settings(silent=True, console="off", disable_code=True),
            )
        finally:
            sys.argv = argv

    def log(self, row: dict[str, Any]) -> None:
        step = row.get("step")
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def close(self) -> None:
        self.run.finish()


TENSORBOARD_DIR = "tensorboard"


class TensorBoardSink:
    """Scalars as TensorBoard event files (torch's writer). A resumed run purges the events a
    killed attempt wrote after the checkpoint's step, as the JSONL sink drops those rows."""

    def __init__(self, log_dir: Path, resumed_at: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "logger.tensorboard=true needs the tensorboard package: "
                "pip install 'bigscale[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(str(log_dir), purge_step=resumed_at + 1 if resumed_at else None)

    def log(self, row: dict[str, Any]) -> None:
        step = int(row.get("step", 0))
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _run_id(run_dir: Path) -> str:
    """The W&B run id lives in the run directory, so every rank restart or requeue of this run
    logs into the same W&B run."""
    path = run_dir / "wandb_run_id"
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)
    path.write_text(run_id + "\n")
    return run_id


class ProgressBar:
    """tqdm's bar on a terminal; into a file (a Slurm log, a pipe) whole lines every
    ``line_seconds`` instead, since a redrawn bar there is one endless carriage-return line."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        line_seconds: float = 30.0,
    ):
        self._stream = stream or sys.stderr
        self._lines = enabled and not self._stream.isatty()
        self._bar = tqdm(
            total=total,
            initial=initial,
            desc="train",
            disable=not enabled or self._lines,
            file=self._stream,
        )
        self._total, self._initial, self._n = total, initial, initial
        self._start = self._last = time.monotonic()
        self._every = line_seconds
        self._postfix = ""

    def update(self, step: int, row: dict[str, Any] | None = None) -> None:
        if row:
            shown = {k: row[k] for k in ("loss", "lr", "tokens_per_s") if k in row}
            self._postfix = ", ".join(f"{k}={v:.3g}" for k, v in shown.items())
            self._bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()}, refresh=False)
        self._bar.update(step - self._bar.n)
        self._n = step
        now = time.monotonic()
        if self._lines and (now - self._last >= self._every or step >= self._total):
            self._last = now
            self._write_line(now)

    def _write_line(self, now: float) -> None:
        elapsed = now - self._start
        done = self._n - self._initial  # this process's steps set the rate, not resumed ones
        meter = tqdm.format_meter(
            self._n,
            self._total,
            elapsed,
            prefix="train",
            postfix=self._postfix or None,
            unit="step",
            rate=done / elapsed if elapsed > 0 and done else None,
        )
        print(meter, file=self._stream, flush=True)

    def close(self) -> None:
        self._bar.close()


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        cfg: LoggerConfig,
        config: dict[str, Any],
        is_main: bool,
        resumed_at: int = 0,
    ):
        self._sinks: list[JsonlSink | WandbSink | TensorBoardSink | MlflowSink] = []
        if not is_main:
            return
        self._sinks.append(JsonlSink(run_dir / "metrics.jsonl", resumed_at))
        if cfg.mode != LoggerMode.disabled:
            self._sinks.append(WandbSink(cfg, run_dir, config))
        if cfg.tensorboard:
            self._sinks.append(TensorBoardSink(run_dir / TENSORBOARD_DIR, resumed_at))
        if cfg.mlflow:
            self._sinks.append(MlflowSink(cfg, run_dir, config))

    def log(self, row: dict[str, Any]) -> None:
        for sink in self._sinks:
            sink.log(row)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf; write null so every line stays parseable by strict readers.
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
