"""Silence third-party chatter that says nothing actionable to a user, once per process.

Kept in one place so the console shows bigscale's plan, progress and errors, not DeepSpeed's
accelerator guess or per-shard progress bars from transformers."""

from __future__ import annotations

import os
import warnings
from types import ModuleType

from bigscale.lazy_imports import when_imported


def quiet_third_party() -> None:
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        # Without this DeepSpeed warns on every import that it "guessed" the CPU.
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    # DeepSpeed calls torch collectives that torch has since renamed; nothing for users to do.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # Configured when (if) this process imports them: importing them only to quiet them cost
    # every launcher 2 s, and the launcher of a run seldom needs either.
    when_imported("transformers", _quiet_transformers)
    when_imported("datasets", _quiet_datasets)


def _quiet_transformers(transformers: ModuleType) -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _quiet_datasets(datasets: ModuleType) -> None:
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
