"""Files a run needs before its ranks start: the tiny model and the built-in arithmetic task
when the presets ask for them. Idempotent and atomic, so the launcher and rank 0 may both call
it."""

from __future__ import annotations

from pathlib import Path

from bigscale.config.schema import TrainConfig
from bigscale.data.tasks import write_arithmetic_task
from bigscale.errors import ConfigError
from bigscale.model.load import ensure_model_files


def prepare_assets(cfg: TrainConfig) -> None:
    ensure_model_files(cfg.model)
    d = cfg.data
    if d.generate_arithmetic:
        paths = [d.path, d.validation_path, d.test_path]
        if any(p is None for p in paths):
            raise ConfigError(
                "data.generate_arithmetic=true needs data.path, data.validation_path and "
                "data.test_path"
            )
        if not all(Path(p).is_file() for p in paths):  # type: ignore[arg-type]
            write_arithmetic_task(*(Path(p) for p in paths), seed=0)  # type: ignore[arg-type]
