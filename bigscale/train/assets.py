"""Files a run needs before its ranks start: the tiny model, a GGUF checkpoint's converted copy
and the built-in tasks (arithmetic, dates) when the presets ask for them.

Generated files go only to bigscale's own folder (``bigscale.home``) and never over an existing
file, so a user's data or model path is read, never written: ``check_generated_data`` refuses a
demo preset pointed at a user's file before anything is written. Idempotent and atomic, so the
launcher and rank 0 may both call ``prepare_assets``."""

from __future__ import annotations

from pathlib import Path

from bigscale.config.schema import BuiltinTask, DataConfig, DataStyle, TrainConfig
from bigscale.data.tasks import write_arithmetic_task, write_dates_task
from bigscale.errors import ConfigError
from bigscale.home import data_dir, is_within
from bigscale.model.source import check_model_source, creates_model

# Presets that read a user's own files, by what the files hold.
USER_FILE_PRESETS = (
    "data=text_files (plain text, data.text_field), data=sft_files (prompt/response pairs), "
    "data=chat_files (messages lists), data=alpaca_files (instruction/input/output)"
)


def check_generated_data(d: DataConfig) -> None:
    """With ``data.generate``, all three paths must be bigscale's own (under
    ``<BIGSCALE_HOME>/data``): the generated task is written there, and a path of the user's
    means the user meant their own data, not the demo."""
    if d.generate is None:
        return
    task = BuiltinTask(d.generate).value
    paths = {"data.path": d.path, "data.validation_path": d.validation_path}
    paths["data.test_path"] = d.test_path
    missing = [key for key, p in paths.items() if p is None]
    if missing:
        raise ConfigError(
            f"data.generate={task} writes the built-in task to data.path, "
            f"data.validation_path and data.test_path, but {', '.join(missing)} is null; set "
            "data.generate=null to use your own files"
        )
    foreign = [(key, p) for key, p in paths.items() if not is_within(p, data_dir())]
    if foreign:
        key, path = foreign[0]
        raise ConfigError(
            f"{key}={path} is outside bigscale's data folder {data_dir()}, but "
            f"data.generate={task}: the data={task} preset generates its own "
            "task there and would never read your file. To train on your file, choose the "
            f"preset for what it holds: {USER_FILE_PRESETS}, e.g. `bigscale train "
            f"data=text_files data.path={d.path}`"
        )


def prepare_assets(cfg: TrainConfig) -> None:
    check_model_source(cfg.model)
    if creates_model(cfg.model) or cfg.model.gguf_file is not None:
        # Imported here: creating (or converting) the model needs torch and transformers,
        # checking does not.
        from bigscale.model.load import ensure_model_files

        ensure_model_files(cfg.model)
    d = cfg.data
    check_generated_data(d)
    if d.generate is not None:
        paths = [Path(p).expanduser() for p in (d.path, d.validation_path, d.test_path) if p]
        if DataStyle(d.style) is DataStyle.preference:  # the task's preference pairs
            from bigscale.data.preference_task import write_pairs_task

            write_pairs_task(BuiltinTask(d.generate).value, *paths, seed=0)
        else:
            write = {
                BuiltinTask.arithmetic: write_arithmetic_task,
                BuiltinTask.dates: write_dates_task,
            }
            write[BuiltinTask(d.generate)](*paths, seed=0)
