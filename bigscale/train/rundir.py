"""Naming of run directories."""

from __future__ import annotations

import time
from pathlib import Path

from bigscale.config.schema import TrainConfig


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("outputs") / cfg.experiment / time.strftime("%Y-%m-%d_%H-%M-%S")
